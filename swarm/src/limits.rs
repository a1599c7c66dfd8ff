//! Connection caps: inbound handshakes in flight, established inbound
//! connections, and connections per peer. A connection over a cap is
//! refused before any protocol runs on it.
//!
//! Replaces `libp2p-connection-limits` 0.7, whose per-peer map kept an
//! empty entry for every peer that ever connected (about 130 bytes each:
//! a relay flooded by fresh identities grew by 16 MiB per 120,000). Here
//! every entry goes with the peer's last connection, so what this holds is
//! bounded by the caps themselves.

use std::collections::{HashMap, HashSet};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::behaviour::{ConnectionClosed, ConnectionEstablished, ListenFailure};
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// A connection refused for being over a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection limit exceeded: at most {max} {what}")]
pub struct LimitExceeded {
    /// Which cap, in words.
    pub what: &'static str,
    /// Its value.
    pub max: usize,
}

/// The caps; `usize::MAX` for none.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub(crate) pending_incoming: usize,
    pub(crate) established_incoming: usize,
    pub(crate) per_peer: usize,
}

/// The behaviour (its handler does nothing).
pub(crate) struct Behaviour {
    caps: Caps,
    /// Inbound connections between accept and the end of their handshake.
    pending_incoming: HashSet<ConnectionId>,
    established_incoming: HashSet<ConnectionId>,
    /// Each connected peer's connections; an entry leaves with the last.
    per_peer: HashMap<PeerId, HashSet<ConnectionId>>,
}

fn check(count: usize, max: usize, what: &'static str) -> Result<(), ConnectionDenied> {
    if count >= max {
        return Err(ConnectionDenied::new(LimitExceeded { what, max }));
    }
    Ok(())
}

impl Behaviour {
    pub(crate) fn new(caps: Caps) -> Self {
        Self {
            caps,
            pending_incoming: HashSet::new(),
            established_incoming: HashSet::new(),
            per_peer: HashMap::new(),
        }
    }

    fn check_peer(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        let held = self.per_peer.get(peer).map_or(0, HashSet::len);
        check(held, self.caps.per_peer, "connections per peer")
    }

    /// Entries held: pending, established inbound, peers (for tests).
    #[cfg(test)]
    fn held(&self) -> (usize, usize, usize) {
        (
            self.pending_incoming.len(),
            self.established_incoming.len(),
            self.per_peer.len(),
        )
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        check(
            self.pending_incoming.len(),
            self.caps.pending_incoming,
            "inbound connections in their handshake",
        )?;
        self.pending_incoming.insert(id);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.pending_incoming.remove(&id);
        check(
            self.established_incoming.len(),
            self.caps.established_incoming,
            "established inbound connections",
        )?;
        self.check_peer(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check_peer(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            }) => {
                if endpoint.is_listener() {
                    self.established_incoming.insert(connection_id);
                }
                self.per_peer
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id);
            }
            FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id,
                connection_id,
                ..
            }) => {
                self.established_incoming.remove(&connection_id);
                if let Some(conns) = self.per_peer.get_mut(&peer_id) {
                    conns.remove(&connection_id);
                    if conns.is_empty() {
                        self.per_peer.remove(&peer_id);
                    }
                }
            }
            FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.pending_incoming.remove(&connection_id);
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

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::core::ConnectedPoint;

    fn listener() -> ConnectedPoint {
        ConnectedPoint::Listener {
            local_addr: "/ip4/127.0.0.1/tcp/1".parse().expect("valid"),
            send_back_addr: "/ip4/127.0.0.1/tcp/2".parse().expect("valid"),
        }
    }

    /// Many peers come and go: nothing is left of them, and the per-peer
    /// and inbound caps refuse what is over them.
    #[test]
    fn caps_hold_and_nothing_outlives_a_connection() {
        let mut b = Behaviour::new(Caps {
            pending_incoming: 2,
            established_incoming: 3,
            per_peer: 2,
        });
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("valid");
        let endpoint = listener();
        for round in 0..1000 {
            let peer = PeerId::random();
            let id = ConnectionId::new_unchecked(round);
            b.handle_pending_inbound_connection(id, &a, &a)
                .expect("under the pending cap");
            b.handle_established_inbound_connection(id, peer, &a, &a)
                .expect("under the caps");
            b.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id: peer,
                connection_id: id,
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: 0,
            }));
            b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
                peer_id: peer,
                connection_id: id,
                endpoint: &endpoint,
                cause: None,
                remaining_established: 0,
            }));
        }
        assert_eq!(b.held(), (0, 0, 0));

        let peer = PeerId::random();
        for i in 0..2 {
            let id = ConnectionId::new_unchecked(10_000 + i);
            b.handle_established_inbound_connection(id, peer, &a, &a)
                .expect("under the per-peer cap");
            b.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
                peer_id: peer,
                connection_id: id,
                endpoint: &endpoint,
                failed_addresses: &[],
                other_established: i,
            }));
        }
        let third = b.handle_established_inbound_connection(
            ConnectionId::new_unchecked(10_002),
            peer,
            &a,
            &a,
        );
        assert!(third.is_err(), "a third connection from one peer passed");

        let p = [
            ConnectionId::new_unchecked(20_000),
            ConnectionId::new_unchecked(20_001),
        ];
        for id in p {
            b.handle_pending_inbound_connection(id, &a, &a)
                .expect("two pending");
        }
        assert!(b
            .handle_pending_inbound_connection(ConnectionId::new_unchecked(20_002), &a, &a)
            .is_err());
        b.on_swarm_event(FromSwarm::ListenFailure(ListenFailure {
            local_addr: &a,
            send_back_addr: &a,
            error: &libp2p::swarm::ListenError::Aborted,
            connection_id: p[0],
            peer_id: None,
        }));
        b.handle_pending_inbound_connection(ConnectionId::new_unchecked(20_003), &a, &a)
            .expect("a failed handshake frees its slot");
    }
}
