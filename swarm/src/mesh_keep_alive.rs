//! Lets a gossipsub connection close once it is idle and outside the mesh.
//!
//! libp2p-swarm keeps a connection open while any of its streams is open,
//! unless the handler that owns the stream calls
//! [`Stream::ignore_for_keep_alive`]. Gossipsub keeps one long-lived stream
//! each way with every peer subscribed to anything, and does not make that
//! call (rust-libp2p issue #5190, open), so its own keep-alive rule (keep a
//! connection only while the peer is in one of our meshes) never takes
//! effect: a serving node stays connected to every server it ever met
//! through a Kademlia walk, a probe or a view sync. At 200 simulated nodes
//! that was about 100 connections per node, and the process ran out of
//! file descriptors.
//!
//! [`Behaviour`] wraps gossipsub's behaviour, unchanged, and its
//! [`Handler`] makes that call on each stream gossipsub negotiates before
//! handing it on. A connection then lives while a mesh needs it (gossipsub
//! says so through `connection_keep_alive`), while another protocol has a
//! stream on it, or until the swarm's idle timeout.

use std::convert::Infallible;
use std::task::{Context, Poll};

use asynchronous_codec::Framed;
use futures::future::Either;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::handler::{
    ConnectionEvent, ConnectionHandlerEvent, InboundUpgradeSend, OutboundUpgradeSend,
    SubstreamProtocol,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionId, FromSwarm, NetworkBehaviour, Stream,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// An upgrade's output that holds the negotiated stream.
pub(crate) trait HoldsStream {
    /// The stream, unless the output cannot hold one.
    fn stream_mut(&mut self) -> Option<&mut Stream>;
}

/// Gossipsub's outbound output: the framed stream and the peer's kind.
impl<C, K> HoldsStream for (Framed<Stream, C>, K) {
    fn stream_mut(&mut self) -> Option<&mut Stream> {
        Some(&mut self.0)
    }
}

/// Gossipsub's inbound output: its stream, or a denied upgrade (never).
impl<A: HoldsStream> HoldsStream for Either<A, Infallible> {
    fn stream_mut(&mut self) -> Option<&mut Stream> {
        match self {
            Either::Left(a) => a.stream_mut(),
            Either::Right(never) => match *never {},
        }
    }
}

type InboundOutput<H> = <<H as ConnectionHandler>::InboundProtocol as InboundUpgradeSend>::Output;
type OutboundOutput<H> =
    <<H as ConnectionHandler>::OutboundProtocol as OutboundUpgradeSend>::Output;

/// A connection handler whose negotiated streams do not keep the
/// connection alive; everything else is the wrapped handler's.
pub(crate) struct Handler<H>(H);

impl<H> ConnectionHandler for Handler<H>
where
    H: ConnectionHandler,
    InboundOutput<H>: HoldsStream,
    OutboundOutput<H>: HoldsStream,
{
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.0.listen_protocol()
    }

    fn connection_keep_alive(&self) -> bool {
        self.0.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.0.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.0.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.0.on_behaviour_event(event)
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(mut negotiated) => {
                if let Some(stream) = negotiated.protocol.stream_mut() {
                    stream.ignore_for_keep_alive();
                }
                self.0
                    .on_connection_event(ConnectionEvent::FullyNegotiatedInbound(negotiated))
            }
            ConnectionEvent::FullyNegotiatedOutbound(mut negotiated) => {
                if let Some(stream) = negotiated.protocol.stream_mut() {
                    stream.ignore_for_keep_alive();
                }
                self.0
                    .on_connection_event(ConnectionEvent::FullyNegotiatedOutbound(negotiated))
            }
            other => self.0.on_connection_event(other),
        }
    }
}

/// A behaviour whose connection handlers are wrapped in [`Handler`];
/// dereferences to the wrapped behaviour for everything else.
pub(crate) struct Behaviour<B>(B);

impl<B> Behaviour<B> {
    pub(crate) fn new(inner: B) -> Self {
        Self(inner)
    }
}

impl<B> std::ops::Deref for Behaviour<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.0
    }
}

impl<B> std::ops::DerefMut for Behaviour<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.0
    }
}

impl<B> NetworkBehaviour for Behaviour<B>
where
    B: NetworkBehaviour,
    Handler<B::ConnectionHandler>:
        ConnectionHandler<FromBehaviour = THandlerInEvent<B>, ToBehaviour = THandlerOutEvent<B>>,
{
    type ConnectionHandler = Handler<B::ConnectionHandler>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_inbound_connection(id, peer, local, remote)
            .map(Handler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
            .map(Handler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.0.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0.on_connection_handler_event(peer, id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}
