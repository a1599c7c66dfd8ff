//! The `NetworkBehaviour`: tracks each peer's connections, routes
//! [`OpenRequest`]s from [`Control`]s to the best one, and dials peers that
//! have none.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::channel::mpsc;
use futures::StreamExt;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished, DialFailure};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, NotifyHandler,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use super::direct::PeerIps;
use super::handler::Handler;
use super::{
    Accepting, Control, OpenRequest, OpenStreamError, OpenStreams, COMMAND_QUEUE, MAX_PENDING_OPENS,
};
use crate::addrs::{is_relayed, leading_ip};

/// One open connection to a peer.
#[derive(Debug, Clone, Copy)]
struct Conn {
    id: ConnectionId,
    relayed: bool,
    /// The peer's IP on this connection (`None`: relayed, or a name).
    ip: Option<IpAddr>,
}

/// Raw streams for every connection (see the module doc).
pub(crate) struct Behaviour {
    accepting: Arc<Accepting>,
    /// Streams handed out and still open, per peer.
    open: Arc<OpenStreams>,
    /// Each peer's IP on its newest direct connection, for direct streams.
    ips: Arc<PeerIps>,
    commands_tx: mpsc::Sender<OpenRequest>,
    commands: mpsc::Receiver<OpenRequest>,
    /// Each connected peer's connections, oldest first. An entry lives
    /// from `ConnectionEstablished` to the last `ConnectionClosed`.
    connections: HashMap<PeerId, Vec<Conn>>,
    /// Requests for peers without a connection, waiting for the dial.
    pending: HashMap<PeerId, Vec<OpenRequest>>,
    /// Events for the swarm: dials, and requests handed to a handler.
    out: VecDeque<ToSwarm<Infallible, OpenRequest>>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self::new()
    }
}

impl Behaviour {
    pub(crate) fn new() -> Self {
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        Self {
            accepting: Arc::default(),
            open: Arc::default(),
            ips: Arc::default(),
            commands_tx,
            commands,
            connections: HashMap::new(),
            pending: HashMap::new(),
            out: VecDeque::new(),
        }
    }

    /// A handle for opening and accepting streams.
    pub(crate) fn new_control(&self) -> Control {
        Control {
            commands: self.commands_tx.clone(),
            accepting: self.accepting.clone(),
        }
    }

    /// The per-peer count of open streams, for the connection manager.
    pub(crate) fn open_streams(&self) -> Arc<OpenStreams> {
        self.open.clone()
    }

    /// The protocols with an accept loop (direct streams are delivered to
    /// them too).
    pub(crate) fn accepting(&self) -> Arc<Accepting> {
        self.accepting.clone()
    }

    /// Each peer's IP on its newest direct connection (kept up to date).
    pub(crate) fn peer_ips(&self) -> Arc<PeerIps> {
        self.ips.clone()
    }

    /// Updates `peer`'s entry in [`Self::peer_ips`] from its connections.
    fn update_ip(&self, peer: PeerId) {
        let ip = self
            .connections
            .get(&peer)
            .and_then(|conns| conns.iter().rev().find_map(|c| c.ip));
        self.ips.set(peer, ip);
    }

    /// The newest direct connection to `peer`, else its newest relayed one.
    fn best(&self, peer: &PeerId) -> Option<ConnectionId> {
        let conns = self.connections.get(peer)?;
        conns
            .iter()
            .rev()
            .find(|c| !c.relayed)
            .or_else(|| conns.last())
            .map(|c| c.id)
    }

    fn route(&mut self, request: OpenRequest) {
        if request.reply.is_canceled() {
            return;
        }
        if let Some(id) = self.best(&request.peer) {
            self.out.push_back(ToSwarm::NotifyHandler {
                peer_id: request.peer,
                handler: NotifyHandler::One(id),
                event: request,
            });
            return;
        }
        let peer = request.peer;
        let waiting = self.pending.entry(peer).or_default();
        waiting.retain(|r| !r.reply.is_canceled());
        if waiting.len() >= MAX_PENDING_OPENS {
            let _ = request
                .reply
                .send(Err(OpenStreamError::Io(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!("{MAX_PENDING_OPENS} streams to {peer} already wait for a connection"),
                ))));
            return;
        }
        let first = waiting.is_empty();
        waiting.push(request);
        if first {
            self.out.push_back(ToSwarm::Dial {
                opts: DialOpts::peer_id(peer)
                    .condition(PeerCondition::DisconnectedAndNotDialing)
                    .build(),
            });
        }
    }

    fn handler(&self, peer: PeerId, conn: ConnectionId) -> Handler {
        Handler::new(peer, conn, self.accepting.clone(), self.open.clone())
    }
}

/// The IP a direct connection's remote address starts with.
fn direct_ip(addr: &Multiaddr) -> Option<IpAddr> {
    (!is_relayed(addr)).then(|| leading_ip(addr)).flatten()
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        conn: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, conn))
    }

    fn handle_established_outbound_connection(
        &mut self,
        conn: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer, conn))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) => {
                let remote = endpoint.get_remote_address();
                self.connections.entry(peer_id).or_default().push(Conn {
                    id: connection_id,
                    relayed: is_relayed(remote),
                    ip: direct_ip(remote),
                });
                self.update_ip(peer_id);
                for request in self.pending.remove(&peer_id).unwrap_or_default() {
                    self.route(request);
                }
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                if let Some(conns) = self.connections.get_mut(&peer_id) {
                    conns.retain(|c| c.id != connection_id);
                    if conns.is_empty() {
                        self.connections.remove(&peer_id);
                    }
                }
                self.update_ip(peer_id);
            }
            FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error,
                ..
            }) => {
                // Another dial is under way (ours was skipped): wait for it.
                if self.connections.contains_key(&peer)
                    || matches!(error, DialError::DialPeerConditionFalse(_))
                {
                    return;
                }
                for request in self.pending.remove(&peer).unwrap_or_default() {
                    let _ = request
                        .reply
                        .send(Err(OpenStreamError::Io(std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            format!("dialling {peer} failed: {error}"),
                        ))));
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Poll::Ready(event);
            }
            match self.commands.poll_next_unpin(cx) {
                Poll::Ready(Some(request)) => self.route(request),
                // `commands_tx` lives in `self`: the channel never ends.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}
