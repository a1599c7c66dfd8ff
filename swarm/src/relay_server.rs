//! The circuit-relay v2 server, guarded against a panic it causes.
//!
//! libp2p-relay 0.22 gives a relayed connection a `dummy` handler (the
//! right side of its `Either` handler) but still lists the connection
//! among those it tells about a status change: `Behaviour::set_status`
//! sends `SetStatus` (a left-side event) to every connection it knows, and
//! the `Either` handler of a relayed one hits `unreachable!()` (its
//! connection task panics, and the relayed connection dies with every
//! stream on it). The event loop sets the status whenever the node's
//! confirmed external addresses change, which happens while peers are
//! connected through relays (rust-libp2p #5412 reports the same panic).
//!
//! [`Behaviour`] wraps the relay server unchanged and drops the events
//! it addresses to relayed connections: their handler has nothing to do
//! with any of them.

use std::collections::HashSet;
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::relay;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, NotifyHandler, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use crate::addrs::is_relayed;

/// The relay server, minus its events for relayed connections.
pub(crate) struct Behaviour {
    inner: relay::Behaviour,
    /// Relayed connections (those with the relay server's dummy handler),
    /// from establishment to close: bounded by the open connections.
    relayed: HashSet<ConnectionId>,
}

impl Behaviour {
    pub(crate) fn new(inner: relay::Behaviour) -> Self {
        Self {
            inner,
            relayed: HashSet::new(),
        }
    }
}

impl std::ops::Deref for Behaviour {
    type Target = relay::Behaviour;
    fn deref(&self) -> &relay::Behaviour {
        &self.inner
    }
}

impl std::ops::DerefMut for Behaviour {
    fn deref_mut(&mut self) -> &mut relay::Behaviour {
        &mut self.inner
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = THandler<relay::Behaviour>;
    type ToSwarm = relay::Event;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        // The relay server's own test for its dummy handler.
        if is_relayed(local) {
            self.relayed.insert(id);
        }
        self.inner
            .handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addrs: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner
            .handle_pending_outbound_connection(id, peer, addrs, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        if is_relayed(addr) {
            self.relayed.insert(id);
        }
        self.inner
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match &event {
            FromSwarm::ConnectionClosed(c) => {
                self.relayed.remove(&c.connection_id);
            }
            // A connection another behaviour denied after ours made its
            // handler never closes: it fails here.
            FromSwarm::ListenFailure(f) => {
                self.relayed.remove(&f.connection_id);
            }
            FromSwarm::DialFailure(f) => {
                self.relayed.remove(&f.connection_id);
            }
            _ => {}
        }
        self.inner.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner.on_connection_handler_event(peer, id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::NotifyHandler {
                    handler: NotifyHandler::One(id),
                    peer_id,
                    ..
                }) if self.relayed.contains(&id) => {
                    tracing::trace!(%peer_id, ?id, "relay server event for a relayed connection dropped");
                }
                other => return other,
            }
        }
    }
}
