//! Getting a working stream to a peer: waiting for a first connection, and
//! opening a stream whose first exchange is retried on a fresh stream when
//! the receiver dropped it at open.
//!
//! Why the retry exists: the receiver may drop a stream at open (its accept
//! loop is [`crate::stream::INBOUND_BACKLOG`] streams behind, or its
//! per-peer quota is spent, or the connection closed under it). The
//! opener's `open_stream` succeeds anyway; the drop shows only as an end of
//! stream on the first read (or a reset on a write). Every protocol of this project that opens streams goes through
//! [`Client::open_stream_with`], so the rule "a stream dropped before it
//! answered is retried on a new one" lives here once.

use std::future::Future;
use std::time::Duration;

use crate::stream::OpenStreamError;
use libp2p::{PeerId, StreamProtocol};

use crate::stream::Stream;
use tokio::time::Instant;

use crate::{Client, Stopped};

/// How often [`Client::wait_connected`] looks at the connection count.
const CONNECTED_POLL: Duration = Duration::from_millis(50);

/// How a stream whose first exchange failed is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reopen {
    /// Streams opened in all, the first included (at least 1).
    pub attempts: u32,
    /// Wait before the n-th retry: `backoff × n` (a busy accept loop
    /// needs a moment to take the next stream).
    pub backoff: Duration,
}

impl Reopen {
    /// Three streams, 50 ms then 100 ms apart: enough for an accept loop
    /// that was busy for a moment (measured with `stream_bench`), short
    /// next to any step timeout.
    pub const DEFAULT: Reopen = Reopen {
        attempts: 3,
        backoff: Duration::from_millis(50),
    };
}

impl Default for Reopen {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// How the first exchange on a fresh stream failed.
#[derive(Debug)]
pub enum Handshake<E> {
    /// The stream ended or broke before the peer answered anything (a
    /// stream the receiver dropped at open looks like this): worth a fresh
    /// stream.
    Dropped(E),
    /// The peer answered, wrongly, or took too long: no retry.
    Failed(E),
}

/// Why [`Client::open_stream_with`] gave no stream.
#[derive(Debug, thiserror::Error)]
pub enum OpenError<E: std::error::Error + 'static> {
    /// No stream could be opened (peer unreachable, protocol not
    /// supported, or no stream within the open timeout).
    #[error(transparent)]
    Open(#[from] OpenStreamError),
    /// The first exchange failed on every stream tried; the last failure.
    #[error(transparent)]
    Handshake(E),
}

/// Why [`Client::wait_connected`] returned without a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// No connection within the wait.
    #[error("no peer reachable within {0:?}: check --bootstrap (or the LAN, for mDNS)")]
    NoPeers(Duration),
    /// The event loop stopped.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

impl Client {
    /// Waits until this node has a connection to at least one peer
    /// (bootstrap or mDNS), for at most `wait`; returns the connected
    /// peers. The one "wait for the swarm" every command starts with.
    pub async fn wait_connected(&self, wait: Duration) -> Result<Vec<PeerId>, WaitError> {
        let deadline = Instant::now() + wait;
        loop {
            let peers = self.connected_peers().await?;
            if !peers.is_empty() {
                return Ok(peers);
            }
            if Instant::now() >= deadline {
                return Err(WaitError::NoPeers(wait));
            }
            tokio::time::sleep(CONNECTED_POLL).await;
        }
    }

    /// Opens a stream for `protocol` to `peer` ([`Client::open_stream`]:
    /// connecting first if needed) and runs `first`, the protocol's first
    /// exchange, on it. When `first` reports [`Handshake::Dropped`], the
    /// exchange is tried again on a fresh stream, up to `reopen.attempts`
    /// streams in all. `first` owns the stream and hands back whatever the
    /// caller keeps (usually the stream and the peer's first answer).
    pub async fn open_stream_with<T, E, F, Fut>(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        reopen: Reopen,
        mut first: F,
    ) -> Result<T, OpenError<E>>
    where
        E: std::error::Error + 'static,
        F: FnMut(Stream) -> Fut,
        Fut: Future<Output = Result<T, Handshake<E>>>,
    {
        let mut attempt = 1;
        loop {
            let stream = self.open_stream(peer, protocol.clone()).await?;
            match first(stream).await {
                Ok(v) => return Ok(v),
                Err(Handshake::Dropped(e)) if attempt < reopen.attempts.max(1) => {
                    tracing::debug!(%peer, %protocol, attempt, error = %e, "stream dropped at open; opening another");
                    tokio::time::sleep(reopen.backoff * attempt).await;
                    attempt += 1;
                }
                Err(Handshake::Dropped(e) | Handshake::Failed(e)) => {
                    return Err(OpenError::Handshake(e))
                }
            }
        }
    }
}
