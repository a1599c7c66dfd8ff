//! Dial backoff: a peer none of whose addresses could be dialled is not
//! dialled again for [`DIAL_BACKOFF`].
//!
//! A dead peer's records outlive it (up to a record TTL), and Kademlia
//! hands out its addresses for longer, so every lookup and view that meets
//! it dials it again. Over QUIC each such dial waits out the whole
//! handshake timeout (UDP brings no "connection refused"), so a `swarm
//! status` or a plan made right after a crash paid it once per lookup: 20 s
//! for one dead peer. With the backoff the first dial pays it and the
//! others fail at once. Connections the peer makes to us are not refused,
//! and one established either way ends its backoff (it is back).

use std::collections::HashMap;
use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::behaviour::ConnectionEstablished;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, DialError, DialFailure, FromSwarm, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// How long a peer that could not be dialled is not dialled again.
pub const DIAL_BACKOFF: Duration = Duration::from_secs(10);
/// Most peers in backoff at once (a bound on a node that meets many dead
/// peers; past it the oldest entries go).
const MAX_BACKED_OFF: usize = 4096;

/// A dial refused because the peer is in backoff.
#[derive(Debug, thiserror::Error)]
#[error("peer {0} could not be dialled in the last {DIAL_BACKOFF:?}")]
pub struct BackedOff(PeerId);

/// The behaviour: refuses dials to peers in backoff.
#[derive(Debug, Default)]
pub struct Behaviour {
    until: HashMap<PeerId, Instant>,
}

impl Behaviour {
    fn backed_off(&mut self, peer: &PeerId) -> bool {
        match self.until.get(peer) {
            Some(t) if Instant::now() < *t => true,
            Some(_) => {
                self.until.remove(peer);
                false
            }
            None => false,
        }
    }

    fn failed(&mut self, peer: PeerId) {
        let now = Instant::now();
        if self.until.len() >= MAX_BACKED_OFF {
            self.until.retain(|_, t| *t > now);
            if self.until.len() >= MAX_BACKED_OFF {
                if let Some(oldest) = self.until.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p) {
                    self.until.remove(&oldest);
                }
            }
        }
        self.until.insert(peer, now + DIAL_BACKOFF);
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        match peer {
            Some(p) if self.backed_off(&p) => Err(ConnectionDenied::new(BackedOff(p))),
            _ => Ok(Vec::new()),
        }
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            // Every address failed in transport: nobody answers there.
            FromSwarm::DialFailure(DialFailure {
                peer_id: Some(peer),
                error: DialError::Transport(_),
                ..
            }) => self.failed(peer),
            FromSwarm::ConnectionEstablished(ConnectionEstablished { peer_id, .. }) => {
                self.until.remove(&peer_id);
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

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    #[test]
    fn a_peer_that_failed_a_dial_is_not_dialled_until_the_backoff_ends() {
        let mut b = Behaviour::default();
        let (dead, alive) = (peer(), peer());
        b.failed(dead);
        let c = ConnectionId::new_unchecked(1);
        assert!(b
            .handle_pending_outbound_connection(c, Some(dead), &[], Endpoint::Dialer)
            .is_err());
        assert!(b
            .handle_pending_outbound_connection(c, Some(alive), &[], Endpoint::Dialer)
            .is_ok());
        // Expired: dialled again.
        b.until
            .insert(dead, Instant::now() - Duration::from_secs(1));
        assert!(b
            .handle_pending_outbound_connection(c, Some(dead), &[], Endpoint::Dialer)
            .is_ok());
        // Bounded.
        for _ in 0..MAX_BACKED_OFF + 10 {
            b.failed(peer());
        }
        assert!(b.until.len() <= MAX_BACKED_OFF);
    }
}
