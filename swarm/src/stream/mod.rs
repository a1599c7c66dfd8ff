//! Raw libp2p streams: the node's own protocols (activations, tokens,
//! pieces, vocabulary, probes) run on plain negotiated substreams.
//!
//! [`Behaviour`] is one `NetworkBehaviour` for all of them; a cloneable
//! [`Control`] opens outbound streams ([`Control::open_stream`]) and
//! registers inbound protocols ([`Control::accept`]). It replaces the
//! `libp2p-stream` crate (0.5.0-alpha), whose per-connection state was
//! never freed when a connection closed (about 0.9 KiB per connection a
//! relay ever saw: a flood of short connections grew it without bound),
//! which handed inbound streams over a channel of capacity 0 (a stream
//! arriving while the previous one was still queued was dropped), and
//! which picked a random connection when a peer had several (a relayed
//! one as often as the direct one that replaced it).
//!
//! What this one keeps, and its bounds:
//! - per connection, one entry (peer, relayed or not), removed when the
//!   connection closes or fails to establish;
//! - per accepted protocol, a queue of at most [`INBOUND_BACKLOG`]
//!   negotiated streams not yet taken by the accept loop (more are
//!   dropped, and logged);
//! - requests to open a stream to a peer without a connection wait for
//!   the dial the behaviour starts; at most [`MAX_PENDING_OPENS`] per
//!   peer, failed when the dial fails.
//!
//! Streams open on the peer's newest direct connection, or on its newest
//! relayed one when it has no direct connection.

mod behaviour;
pub mod direct;
mod handler;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::channel::{mpsc, oneshot};
use futures::{AsyncRead, AsyncWrite, SinkExt, StreamExt};
use libp2p::swarm::ConnectionId;
use libp2p::{PeerId, StreamProtocol};

pub(crate) use behaviour::Behaviour;

/// Negotiated inbound streams queued per protocol for its accept loop.
/// Beyond it a stream is dropped (its opener reads end-of-stream): an
/// accept loop that does not keep up sheds load instead of buffering it.
pub const INBOUND_BACKLOG: usize = 32;

/// `open_stream` requests that may wait for a dial to one peer. Local
/// callers only; beyond it a request fails at once.
pub const MAX_PENDING_OPENS: usize = 64;

/// Requests from every [`Control`] to the behaviour, queued.
const COMMAND_QUEUE: usize = 64;

/// A negotiated stream of one of the node's own protocols (from
/// [`Control::open_stream`] or [`IncomingStreams`]): libp2p's stream,
/// counted in [`OpenStreams`] while it lives, so that the connection
/// manager never closes a connection a stream of ours is open on. Read
/// and write it with the `futures` I/O traits, and flush after writing: a
/// direct stream ([`direct`]) holds written bytes in noise's buffer (up to
/// 64 KiB) until flushed.
pub struct Stream {
    inner: Inner,
    /// Counted open until dropped or [`Stream::ignore_for_keep_alive`]
    /// (boxed: a `PeerId` would double the stream's size).
    open: Option<Box<OpenGuard>>,
}

/// What a [`Stream`] runs on.
enum Inner {
    /// A substream of a libp2p connection (noise, yamux).
    Libp2p(libp2p::Stream),
    /// A TCP connection of its own with noise ([`direct`]); boxed: it
    /// holds noise's buffers.
    Direct(Box<direct::DirectConn>),
}

impl Stream {
    pub(crate) fn new(
        inner: libp2p::Stream,
        peer: PeerId,
        conn: ConnectionId,
        open: &Arc<OpenStreams>,
    ) -> Self {
        Self {
            inner: Inner::Libp2p(inner),
            open: Some(Box::new(OpenGuard::new(peer, Some(conn), open.clone()))),
        }
    }

    /// A direct stream, counted open against `peer` (it keeps the peer's
    /// libp2p connections from the connection manager, as a libp2p stream
    /// would, but against none of them in particular).
    pub(crate) fn direct(conn: direct::DirectConn, peer: PeerId, open: &Arc<OpenStreams>) -> Self {
        Self {
            inner: Inner::Direct(Box::new(conn)),
            open: Some(Box::new(OpenGuard::new(peer, None, open.clone()))),
        }
    }

    /// Whether this stream runs on a TCP connection of its own (a direct
    /// stream, [`crate::Client::open_link_with`]) rather than on
    /// a libp2p connection.
    pub fn is_direct(&self) -> bool {
        matches!(self.inner, Inner::Direct(_))
    }

    /// This stream alone neither keeps its connection open (libp2p's
    /// idle timeout) nor protects it from the connection manager: for a
    /// long-lived stream that is only worth it while the connection is
    /// there for other reasons (RTT probes).
    pub fn ignore_for_keep_alive(&mut self) {
        if let Inner::Libp2p(s) = &mut self.inner {
            s.ignore_for_keep_alive();
        }
        self.open = None;
    }
}

/// Runs `$call` on whichever I/O `$inner` holds.
macro_rules! on_inner {
    ($this:expr, |$io:ident| $call:expr) => {
        match &mut $this.inner {
            Inner::Libp2p($io) => {
                let $io = Pin::new($io);
                $call
            }
            Inner::Direct(d) => {
                let $io = Pin::new(&mut d.io);
                $call
            }
        }
    };
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("direct", &self.is_direct())
            .field("counted", &self.open.is_some())
            .finish()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        on_inner!(self, |io| io.poll_read(cx, buf))
    }

    fn poll_read_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> Poll<std::io::Result<usize>> {
        on_inner!(self, |io| io.poll_read_vectored(cx, bufs))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        on_inner!(self, |io| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        on_inner!(self, |io| io.poll_write_vectored(cx, bufs))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_inner!(self, |io| io.poll_flush(cx))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_inner!(self, |io| io.poll_close(cx))
    }
}

/// How many [`Stream`]s are open per peer and per connection (those not
/// marked [`Stream::ignore_for_keep_alive`]). One entry per peer and per
/// connection with at least one: bounded by the streams alive, which
/// their protocols bound.
#[derive(Default)]
pub(crate) struct OpenStreams {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    per_peer: HashMap<PeerId, usize>,
    per_conn: HashMap<ConnectionId, usize>,
}

impl OpenStreams {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // Counts only go up and down by one under the lock: still whole
        // after a panic elsewhere.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a stream of ours to `peer` is open.
    pub(crate) fn any(&self, peer: &PeerId) -> bool {
        self.lock().per_peer.contains_key(peer)
    }

    /// Whether a stream of ours is open on connection `conn` (closing it
    /// would break that stream).
    pub(crate) fn on_connection(&self, conn: &ConnectionId) -> bool {
        self.lock().per_conn.contains_key(conn)
    }
}

/// Takes one from `map[key]`, removing the entry at zero.
fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// One stream's count in [`OpenStreams`], given back on drop.
struct OpenGuard {
    peer: PeerId,
    /// The libp2p connection the stream runs on (`None`: a direct stream).
    conn: Option<ConnectionId>,
    counts: Arc<OpenStreams>,
}

impl OpenGuard {
    fn new(peer: PeerId, conn: Option<ConnectionId>, counts: Arc<OpenStreams>) -> Self {
        {
            let mut c = counts.lock();
            *c.per_peer.entry(peer).or_default() += 1;
            if let Some(conn) = conn {
                *c.per_conn.entry(conn).or_default() += 1;
            }
        }
        Self { peer, conn, counts }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        release(&mut c.per_peer, &self.peer);
        if let Some(conn) = &self.conn {
            release(&mut c.per_conn, conn);
        }
    }
}

/// Why [`Control::open_stream`] gave no stream.
#[derive(Debug, thiserror::Error)]
pub enum OpenStreamError {
    /// The peer does not accept the protocol.
    #[error("the peer does not support {0}")]
    UnsupportedProtocol(StreamProtocol),
    /// No connection, the connection closed, or negotiation failed.
    #[error("failed to open a stream: {0}")]
    Io(#[from] std::io::Error),
}

/// [`Control::accept`] was called for a protocol whose [`IncomingStreams`]
/// is still alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the protocol already has an accept loop")]
pub struct AlreadyRegistered;

/// One request to open a stream, from a [`Control`] to the behaviour and
/// on to a connection's handler.
#[derive(Debug)]
pub(crate) struct OpenRequest {
    pub(crate) peer: PeerId,
    pub(crate) protocol: StreamProtocol,
    pub(crate) reply: oneshot::Sender<Result<Stream, OpenStreamError>>,
}

/// The protocols with an accept loop, shared by the behaviour's handlers
/// (which read it for every inbound stream) and [`Control::accept`].
#[derive(Default)]
pub(crate) struct Accepting {
    queues: Mutex<HashMap<StreamProtocol, mpsc::Sender<(PeerId, Stream)>>>,
}

impl Accepting {
    fn lock(&self) -> MutexGuard<'_, HashMap<StreamProtocol, mpsc::Sender<(PeerId, Stream)>>> {
        // A panic while holding the lock leaves a map that is still whole.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The protocols an inbound stream may negotiate now.
    pub(crate) fn protocols(&self) -> Vec<StreamProtocol> {
        let mut queues = self.lock();
        queues.retain(|_, tx| !tx.is_closed());
        queues.keys().cloned().collect()
    }

    /// Whether `protocol` has an accept loop now.
    pub(crate) fn accepts(&self, protocol: &StreamProtocol) -> bool {
        self.lock().get(protocol).is_some_and(|tx| !tx.is_closed())
    }

    /// Hands a negotiated inbound stream to its accept loop, or drops it
    /// when the loop is gone or [`INBOUND_BACKLOG`] streams wait already.
    pub(crate) fn deliver(&self, peer: PeerId, protocol: StreamProtocol, stream: Stream) {
        let mut queues = self.lock();
        let Some(tx) = queues.get_mut(&protocol) else {
            tracing::debug!(%peer, %protocol, "inbound stream for a protocol no longer accepted; dropped");
            return;
        };
        match tx.try_send((peer, stream)) {
            Ok(()) => {}
            Err(e) if e.is_full() => {
                tracing::debug!(%peer, %protocol, backlog = INBOUND_BACKLOG, "accept loop behind; inbound stream dropped");
            }
            Err(_) => {
                queues.remove(&protocol);
            }
        }
    }
}

/// The handle to raw streams: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Control {
    commands: mpsc::Sender<OpenRequest>,
    accepting: Arc<Accepting>,
}

impl Control {
    /// Opens a stream for `protocol` to `peer` on its best connection
    /// (see the module doc), dialling it if it has none. No timeout of its
    /// own beyond the negotiation's: callers that dial should bound it
    /// (`Client::open_stream` does).
    pub async fn open_stream(
        &mut self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<Stream, OpenStreamError> {
        let gone = || {
            OpenStreamError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the swarm stopped, or the connection closed before the stream opened",
            ))
        };
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(OpenRequest {
                peer,
                protocol,
                reply,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Accepts inbound streams for `protocol` until the returned
    /// [`IncomingStreams`] is dropped. Peers that open `protocol` while
    /// nothing accepts it get [`OpenStreamError::UnsupportedProtocol`].
    pub fn accept(
        &mut self,
        protocol: StreamProtocol,
    ) -> Result<IncomingStreams, AlreadyRegistered> {
        let mut queues = self.accepting.lock();
        queues.retain(|_, tx| !tx.is_closed());
        if queues.contains_key(&protocol) {
            return Err(AlreadyRegistered);
        }
        // `channel(n)` holds n + 1 (one slot per sender, and there is one).
        let (tx, rx) = mpsc::channel(INBOUND_BACKLOG - 1);
        queues.insert(protocol, tx);
        Ok(IncomingStreams { rx })
    }
}

/// Inbound streams of one protocol, with the peer that opened each.
#[must_use = "streams wait (and then are dropped) unless this is polled"]
pub struct IncomingStreams {
    rx: mpsc::Receiver<(PeerId, Stream)>,
}

impl futures::Stream for IncomingStreams {
    type Item = (PeerId, Stream);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_next_unpin(cx)
    }
}
