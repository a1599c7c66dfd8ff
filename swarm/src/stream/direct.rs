//! Direct streams: one stream of the node's own protocols on a TCP
//! connection of its own, secured by noise with the node's libp2p identity,
//! without yamux and the libp2p connection's task in between.
//!
//! Why: a message on a libp2p stream is read from the socket by the
//! connection's task (noise, yamux), which then wakes the task reading the
//! stream; on a direct stream the reading task owns the socket. On
//! loopback, with the threads asleep between messages as a chain's hops
//! are, that is about 75-90 µs less a link (`examples/rtt_bench.rs`,
//! `docs/speed.md`), and a chain step crosses a link per hop.
//!
//! The wire, on a fresh TCP connection to the receiver's direct port:
//! libp2p's noise XX handshake (`libp2p-noise`, the same identity keys as
//! the libp2p connections: each side learns and checks the other's
//! `PeerId`); then the opener writes the protocol's name (`u8` length,
//! UTF-8) and the receiver answers one byte: `1` the stream is queued for
//! the protocol's accept loop, `0` nobody serves that protocol here. From
//! then on the connection carries the protocol's bytes as a libp2p stream
//! of it would, and its end is the stream's end.
//!
//! How an opener finds the port: [`DIRECT_PROTOCOL`] over libp2p answers
//! the receiver's direct port (`u16` LE, `0`: none), remembered per peer.
//! It dials that port at the IP of its own direct (not relayed) libp2p
//! connection to the peer, never at an address learnt elsewhere: a peer
//! can only point it at the host it is connected from. A peer without a
//! direct connection, a direct listener, or whose port does not answer in
//! [`DIRECT_OPEN_TIMEOUT`] (a firewall, a NAT that forwards only the
//! libp2p port) gets libp2p streams, and no direct attempt for
//! [`DIRECT_RETRY_AFTER`].
//!
//! Bounds on the receiving side: at most [`MAX_DIRECT_INBOUND`] direct
//! connections at once, handshakes included (more are closed at once),
//! each handshake done within [`DIRECT_HANDSHAKE_TIMEOUT`]; an accepted
//! stream then meets the same backlog and per-peer quotas as a libp2p one.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
use libp2p::identity::Keypair;
use libp2p::{noise, PeerId, StreamProtocol};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

use super::{Accepting, OpenStreams, Stream};

/// The libp2p protocol that answers a node's direct port.
pub const DIRECT_PROTOCOL: StreamProtocol = StreamProtocol::new("/nakshatra/direct/1");

/// Longest a direct stream takes to open once the port is known (TCP
/// connect, noise handshake, the receiver's answer), and longest the port
/// query takes. Past it the stream opens over libp2p.
pub const DIRECT_OPEN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a peer whose direct port failed (or that has none) gets only
/// libp2p streams before a direct one is tried again.
pub const DIRECT_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Inbound direct connections open at once (handshakes and streams).
pub const MAX_DIRECT_INBOUND: usize = 256;

/// Longest an inbound direct connection may take to finish the noise
/// handshake and name its protocol.
pub const DIRECT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalive on direct connections: the first probe after this much
/// silence, then every [`KEEPALIVE_INTERVAL`]; the kernel gives up after
/// its usual count of unanswered probes. A libp2p connection notices a
/// silently dead peer by its pings; a direct one by these probes (and the
/// chain's own step deadlines).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);

/// See [`KEEPALIVE_IDLE`].
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// No Nagle (a step's frame goes out at once) and keepalive probes.
fn tune(tcp: &TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}

/// The noise "protocol info" argument (unused by libp2p-noise's upgrade).
const NOISE: &str = "/noise";

/// The I/O of a direct stream: noise over the node's own TCP socket.
pub(crate) type DirectIo = noise::Output<Compat<TcpStream>>;

/// A direct stream's socket and, inbound, its place among
/// [`MAX_DIRECT_INBOUND`].
pub(crate) struct DirectConn {
    pub(crate) io: DirectIo,
    _permit: Option<OwnedSemaphorePermit>,
}

/// What the opener knows of a peer's direct port.
#[derive(Debug, Clone, Copy)]
enum Known {
    Port(u16),
    /// No direct stream until then.
    Unavailable(Instant),
}

/// The IP of each peer's newest direct libp2p connection (kept by the
/// stream behaviour, read by openers).
#[derive(Default)]
pub(crate) struct PeerIps {
    ips: Mutex<HashMap<PeerId, IpAddr>>,
}

impl PeerIps {
    fn lock(&self) -> MutexGuard<'_, HashMap<PeerId, IpAddr>> {
        // Single inserts and removes: whole after a panic elsewhere.
        self.ips.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set(&self, peer: PeerId, ip: Option<IpAddr>) {
        let mut ips = self.lock();
        match ip {
            Some(ip) => ips.insert(peer, ip),
            None => ips.remove(&peer),
        };
    }

    fn get(&self, peer: &PeerId) -> Option<IpAddr> {
        self.lock().get(peer).copied()
    }
}

/// Why a direct stream did not open.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DirectError {
    #[error("the peer does not serve {0} on direct streams")]
    NotServed(String),
    #[error("the peer at the direct port is {0}")]
    WrongPeer(PeerId),
    #[error("noise handshake: {0}")]
    Noise(#[from] noise::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no answer within {DIRECT_OPEN_TIMEOUT:?}")]
    TimedOut,
}

/// A node's direct streams: its identity, its listener's port, and what
/// it knows of its peers' ports.
pub(crate) struct Direct {
    key: Keypair,
    /// This node's direct listener's port.
    port: u16,
    ips: Arc<PeerIps>,
    open: Arc<OpenStreams>,
    known: Mutex<HashMap<PeerId, Known>>,
}

impl Direct {
    pub(crate) fn new(key: Keypair, port: u16, ips: Arc<PeerIps>, open: Arc<OpenStreams>) -> Self {
        Self {
            key,
            port,
            ips,
            open,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn known(&self) -> MutexGuard<'_, HashMap<PeerId, Known>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node's direct port (what [`DIRECT_PROTOCOL`] answers).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Where to dial `peer` directly: `Ok(None)` when its port must be
    /// asked first, `Err` when no direct stream is to be tried now.
    pub(crate) fn target(&self, peer: &PeerId) -> Result<Option<SocketAddr>, ()> {
        let ip = self.ips.get(peer).ok_or(())?;
        let mut known = self.known();
        match known.get(peer).copied() {
            Some(Known::Port(port)) => Ok(Some(SocketAddr::new(ip, port))),
            Some(Known::Unavailable(until)) if Instant::now() < until => Err(()),
            Some(Known::Unavailable(_)) => {
                known.remove(peer);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// The IP of the direct connection to `peer`, if any.
    pub(crate) fn ip(&self, peer: &PeerId) -> Option<IpAddr> {
        self.ips.get(peer)
    }

    /// Remembers `peer`'s port (`0`: none, as [`Self::mark_unavailable`]).
    pub(crate) fn learn_port(&self, peer: PeerId, port: u16) {
        let now = Instant::now();
        let entry = match port {
            0 => Known::Unavailable(now + DIRECT_RETRY_AFTER),
            port => Known::Port(port),
        };
        let mut known = self.known();
        known.insert(peer, entry);
        // Bounded by the peers this node opens direct streams to; entries
        // of unavailable peers past their time go here.
        known.retain(|_, k| !matches!(k, Known::Unavailable(until) if *until <= now));
    }

    /// No direct stream to `peer` for [`DIRECT_RETRY_AFTER`].
    pub(crate) fn mark_unavailable(&self, peer: PeerId) {
        self.learn_port(peer, 0);
    }

    /// Opens a direct stream for `protocol` to `peer` at `addr`, within
    /// [`DIRECT_OPEN_TIMEOUT`].
    pub(crate) async fn dial(
        &self,
        peer: PeerId,
        addr: SocketAddr,
        protocol: &StreamProtocol,
    ) -> Result<Stream, DirectError> {
        let open = async {
            let tcp = TcpStream::connect(addr).await?;
            tune(&tcp)?;
            let (remote, mut io) = noise::Config::new(&self.key)?
                .upgrade_outbound(tcp.compat(), NOISE)
                .await?;
            if remote != peer {
                return Err(DirectError::WrongPeer(remote));
            }
            let name = protocol.as_ref().as_bytes();
            let len = u8::try_from(name.len())
                .map_err(|_| DirectError::NotServed(protocol.to_string()))?;
            let mut hello = Vec::with_capacity(1 + name.len());
            hello.push(len);
            hello.extend_from_slice(name);
            io.write_all(&hello).await?;
            io.flush().await?;
            let mut answer = [0u8];
            io.read_exact(&mut answer).await?;
            if answer[0] != 1 {
                return Err(DirectError::NotServed(protocol.to_string()));
            }
            Ok(Stream::direct(
                DirectConn { io, _permit: None },
                peer,
                &self.open,
            ))
        };
        tokio::time::timeout(DIRECT_OPEN_TIMEOUT, open)
            .await
            .map_err(|_| DirectError::TimedOut)?
    }
}

/// Binds the direct listener at `addr` (port 0: any free port) and accepts
/// direct streams on it until `stop` fires; returns the port.
pub(crate) async fn spawn_listener(
    addr: SocketAddr,
    key: Keypair,
    accepting: Arc<Accepting>,
    open: Arc<OpenStreams>,
    mut stop: tokio::sync::watch::Receiver<()>,
) -> std::io::Result<u16> {
    let listener = TcpListener::bind(addr).await?;
    let port = listener.local_addr()?.port();
    let slots = Arc::new(Semaphore::new(MAX_DIRECT_INBOUND));
    tokio::spawn(async move {
        loop {
            let (tcp, from) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, mostly: wait a moment.
                        tracing::debug!("direct listener: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%from, limit = MAX_DIRECT_INBOUND, "direct connections at their limit; closed");
                continue;
            };
            let (key, accepting, open) = (key.clone(), accepting.clone(), open.clone());
            tokio::spawn(async move {
                let accept = accept_one(tcp, key, &accepting, &open, permit);
                match tokio::time::timeout(DIRECT_HANDSHAKE_TIMEOUT, accept).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%from, "direct stream refused: {e}"),
                    Err(_) => tracing::debug!(%from, "direct handshake took too long; closed"),
                }
            });
        }
    });
    Ok(port)
}

/// One inbound direct connection: handshake, protocol, hand-over.
async fn accept_one(
    tcp: TcpStream,
    key: Keypair,
    accepting: &Accepting,
    open: &Arc<OpenStreams>,
    permit: OwnedSemaphorePermit,
) -> Result<(), DirectError> {
    tune(&tcp)?;
    let (peer, mut io) = noise::Config::new(&key)?
        .upgrade_inbound(tcp.compat(), NOISE)
        .await?;
    let mut len = [0u8];
    io.read_exact(&mut len).await?;
    let mut name = vec![0u8; usize::from(len[0])];
    io.read_exact(&mut name).await?;
    let name = String::from_utf8_lossy(&name).into_owned();
    let served = StreamProtocol::try_from_owned(name.clone())
        .ok()
        .filter(|p| *p != DIRECT_PROTOCOL && accepting.accepts(p));
    io.write_all(&[u8::from(served.is_some())]).await?;
    io.flush().await?;
    let Some(protocol) = served else {
        return Err(DirectError::NotServed(name));
    };
    let stream = Stream::direct(
        DirectConn {
            io,
            _permit: Some(permit),
        },
        peer,
        open,
    );
    accepting.deliver(peer, protocol, stream);
    Ok(())
}
