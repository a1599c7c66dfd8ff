//! Serving the node's own stream protocols: one accept loop per protocol
//! that hands each stream to its own task at once (streams that find the
//! loop's backlog full are dropped), and per-peer caps: a peer
//! that opens more streams of one protocol than its share gets the extra
//! ones dropped at once, before anything is read from them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};

use crate::stream::Stream;

use crate::Client;

impl Client {
    /// Serves `protocol` until the swarm stops: every inbound stream runs
    /// `handler(peer, stream)` in a task of its own, while its peer holds
    /// fewer than `per_peer` streams of this protocol; a stream over the
    /// share is dropped unread. Fails if `protocol` is already served.
    ///
    /// The returned [`Served`] stops the accept loop when asked (dropping
    /// it does not): a node that moves to another range serves the
    /// protocol again with a new handler, while the streams the old one
    /// accepted run on to their end.
    pub fn serve_protocol<F, Fut>(
        &self,
        protocol: StreamProtocol,
        per_peer: usize,
        handler: F,
    ) -> Result<Served, crate::stream::AlreadyRegistered>
    where
        F: Fn(PeerId, Stream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut incoming = self.stream_control().accept(protocol.clone())?;
        let quota = PeerQuota::new(per_peer);
        let task = tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let Some(permit) = quota.try_acquire(peer) else {
                    tracing::debug!(%peer, %protocol, "stream over the peer's share; dropped");
                    continue;
                };
                let task = handler(peer, stream);
                tokio::spawn(async move {
                    task.await;
                    drop(permit);
                });
            }
        });
        Ok(Served { task })
    }
}

/// One protocol's accept loop (see [`Client::serve_protocol`]).
#[derive(Debug)]
pub struct Served {
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Stops accepting streams; those already accepted run on. Once this
    /// returns, the protocol may be served again.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// How many streams of one protocol each peer may have open at once.
#[derive(Debug, Clone)]
pub struct PeerQuota {
    cap: usize,
    held: Arc<Mutex<HashMap<PeerId, usize>>>,
}

/// One stream's place in a [`PeerQuota`], given back when dropped.
#[derive(Debug)]
pub struct QuotaPermit {
    peer: PeerId,
    held: Arc<Mutex<HashMap<PeerId, usize>>>,
}

impl PeerQuota {
    /// At most `cap` streams per peer (at least 1).
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            held: Arc::default(),
        }
    }

    /// A place for one more stream of `peer`, or `None` when it holds its
    /// share already.
    pub fn try_acquire(&self, peer: PeerId) -> Option<QuotaPermit> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let n = held.entry(peer).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(QuotaPermit {
            peer,
            held: self.held.clone(),
        })
    }

    /// Streams `peer` holds now.
    pub fn held(&self, peer: &PeerId) -> usize {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(peer).copied().unwrap_or(0)
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_no_more() {
        let q = PeerQuota::new(2);
        let (a, b) = (PeerId::random(), PeerId::random());
        let p1 = q.try_acquire(a).unwrap();
        let _p2 = q.try_acquire(a).unwrap();
        assert!(q.try_acquire(a).is_none());
        // Another peer is not affected.
        let _p3 = q.try_acquire(b).unwrap();
        drop(p1);
        assert_eq!(q.held(&a), 1);
        assert!(q.try_acquire(a).is_some());
    }
}
