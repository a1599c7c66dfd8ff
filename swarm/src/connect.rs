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

use crate::stream::direct::{DirectError, DIRECT_OPEN_TIMEOUT, DIRECT_PROTOCOL};
use crate::stream::OpenStreamError;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};

use crate::stream::Stream;
use tokio::time::Instant;

use crate::{Client, Stopped};

/// Streams of [`DIRECT_PROTOCOL`] one peer may hold open at once.
const DIRECT_PORT_QUERIES_PER_PEER: usize = 4;

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
        first: F,
    ) -> Result<T, OpenError<E>>
    where
        E: std::error::Error + 'static,
        F: FnMut(Stream) -> Fut,
        Fut: Future<Output = Result<T, Handshake<E>>>,
    {
        self.open_link_with(peer, protocol, reopen, false, first)
            .await
    }

    /// As [`Client::open_stream_with`]; with `direct`, on a direct stream
    /// where one opens (a TCP connection of its own with noise,
    /// [`crate::stream::direct`]: a chain's links), else on a libp2p
    /// stream. A direct stream is tried when this node has a direct
    /// listener, a direct (not relayed) connection to `peer`, and `peer` a
    /// direct port that answered lately; asking the port and opening cost
    /// at most [`DIRECT_OPEN_TIMEOUT`] each, once per peer while it
    /// answers.
    pub async fn open_link_with<T, E, F, Fut>(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        reopen: Reopen,
        direct: bool,
        mut first: F,
    ) -> Result<T, OpenError<E>>
    where
        E: std::error::Error + 'static,
        F: FnMut(Stream) -> Fut,
        Fut: Future<Output = Result<T, Handshake<E>>>,
    {
        let mut attempt = 1;
        loop {
            let direct = match direct {
                true => self.direct_stream(peer, &protocol).await,
                false => None,
            };
            let stream = match direct {
                Some(s) => s,
                None => self.open_stream(peer, protocol.clone()).await?,
            };
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

impl Client {
    /// Serves [`DIRECT_PROTOCOL`]: answers this node's direct port (`0`
    /// without a listener) and closes the stream.
    pub(crate) fn serve_direct_port(&self) {
        let port = self.direct().map_or(0, |d| d.port());
        let served = self.serve_protocol(
            DIRECT_PROTOCOL,
            DIRECT_PORT_QUERIES_PER_PEER,
            move |_peer, mut s| async move {
                let answer = async {
                    s.write_all(&port.to_le_bytes()).await?;
                    s.close().await
                };
                let _ = tokio::time::timeout(DIRECT_OPEN_TIMEOUT, answer).await;
            },
        );
        if let Err(e) = served {
            tracing::warn!("direct port not served: {e}");
        }
    }

    /// A direct stream for `protocol` to `peer`, or `None` when none is to
    /// be had now (see [`Client::open_link_with`]).
    async fn direct_stream(&self, peer: PeerId, protocol: &StreamProtocol) -> Option<Stream> {
        let direct = self.direct()?;
        if direct.ip(&peer).is_none() {
            // Not connected yet (or only through a relay): connect as a
            // libp2p stream would, then look again.
            self.connect(peer).await;
        }
        let addr = match direct.target(&peer).ok()? {
            Some(addr) => addr,
            None => {
                let port = self.query_direct_port(peer).await.unwrap_or(0);
                direct.learn_port(peer, port);
                direct.target(&peer).ok()??
            }
        };
        match direct.dial(peer, addr, protocol).await {
            Ok(stream) => {
                tracing::debug!(%peer, %addr, %protocol, "direct stream open");
                Some(stream)
            }
            Err(e @ DirectError::NotServed(_)) => {
                tracing::debug!(%peer, %addr, "no direct stream: {e}");
                None
            }
            Err(e) => {
                tracing::debug!(%peer, %addr, "direct stream failed, libp2p streams for a while: {e}");
                direct.mark_unavailable(peer);
                None
            }
        }
    }

    /// `peer`'s direct port, asked over libp2p within
    /// [`DIRECT_OPEN_TIMEOUT`]; `None` when it has none or did not say.
    async fn query_direct_port(&self, peer: PeerId) -> Option<u16> {
        let ask = async {
            let mut s = self.open_stream(peer, DIRECT_PROTOCOL).await.ok()?;
            let mut port = [0u8; 2];
            s.read_exact(&mut port).await.ok()?;
            Some(u16::from_le_bytes(port))
        };
        tokio::time::timeout(DIRECT_OPEN_TIMEOUT, ask)
            .await
            .ok()
            .flatten()
            .filter(|p| *p != 0)
    }
}
