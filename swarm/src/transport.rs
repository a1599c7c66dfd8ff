//! TCP and QUIC side by side, and a dead peer found out fast on both.
//!
//! A dial to a live host whose node process is gone fails at once over
//! TCP (the host answers with a reset: "connection refused"), but over
//! QUIC it waits out the whole handshake timeout: UDP has no reset, and
//! quinn ignores the ICMP "port unreachable" the host sends. libp2p dials
//! a peer's addresses concurrently and reports the dial only when every
//! one has failed, and Kademlia dials such a peer again on every query
//! that other peers' routing tables lead to it, so each lookup would wait
//! for the dead QUIC address.
//!
//! [`TcpRefusals`] records which (peer, IP) a TCP dial was refused by;
//! [`AbortOnRefusal`] wraps the QUIC transport and fails a QUIC dial to
//! the same peer at the same IP as soon as such a refusal is recorded
//! after the dial started (the process behind both is gone). A dial to
//! an address without `/p2p/<peer id>` is never aborted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::core::Transport;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// Longest a TCP connection may take from dial to a ready noise + yamux
/// session, by default ([`crate::SwarmConfig::dial_timeout`]). A host
/// that drops SYNs (a NAT router with nothing forwarded, a firewall) would
/// otherwise hold the dial for the kernel's SYN retries (minutes): an
/// AutoNAT dial-back to such an address would never report it
/// unreachable, and a node behind that router would never reserve a relay
/// slot. QUIC has its own handshake timeout (5 s).
pub(crate) const TCP_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a pending QUIC dial checks for a refusal of its TCP twin.
#[cfg(feature = "quic")]
const REFUSAL_POLL: Duration = Duration::from_millis(50);
/// How long a refusal is remembered (longer than any QUIC handshake).
const REFUSAL_MEMORY: Duration = Duration::from_secs(30);
/// Most refusals remembered (a bound on a node dialling many dead peers).
const MAX_REFUSALS: usize = 1024;

/// The (peer, IP) pairs a TCP dial was refused by, and when. Cloned
/// handles share one table.
#[derive(Debug, Clone, Default)]
pub(crate) struct TcpRefusals(Arc<Mutex<HashMap<(PeerId, IpAddr), Instant>>>);

impl TcpRefusals {
    fn record(&self, key: (PeerId, IpAddr)) {
        let now = Instant::now();
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= MAX_REFUSALS {
            t.retain(|_, at| now.duration_since(*at) < REFUSAL_MEMORY);
            if t.len() >= MAX_REFUSALS {
                t.clear();
            }
        }
        t.insert(key, now);
    }

    /// `key` accepted a TCP connection: its earlier refusal no longer
    /// counts.
    fn accepted(&self, key: &(PeerId, IpAddr)) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.remove(key);
    }

    /// Whether `key` refused a TCP dial at or after `since`, or in the
    /// last [`REFUSAL_MEMORY`] without accepting one since. The second
    /// case covers dials that do not run side by side: a peer's TCP
    /// address alone first (a provider record carries only its confirmed
    /// external addresses, which may be TCP only), its QUIC address later.
    #[cfg_attr(not(feature = "quic"), allow(dead_code))]
    fn refused_since(&self, key: &(PeerId, IpAddr), since: Instant) -> bool {
        let t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.get(key)
            .is_some_and(|at| *at >= since || at.elapsed() < REFUSAL_MEMORY)
    }
}

/// The peer and IP of a dialled address (`/ip4|ip6/<ip>/.../p2p/<id>`).
fn peer_ip(addr: &Multiaddr) -> Option<(PeerId, IpAddr)> {
    let ip = crate::addrs::leading_ip(addr)?;
    match addr.iter().last()? {
        Protocol::P2p(peer) => Some((peer, ip)),
        _ => None,
    }
}

/// The raw TCP transport, recording refused dials in [`TcpRefusals`].
pub(crate) struct RecordRefusals<T> {
    inner: T,
    refusals: TcpRefusals,
}

impl<T> RecordRefusals<T> {
    pub(crate) fn new(inner: T, refusals: TcpRefusals) -> Self {
        RecordRefusals { inner, refusals }
    }
}

impl<T> Transport for RecordRefusals<T>
where
    T: Transport<Error = std::io::Error> + Unpin,
    T::Dial: Send + 'static,
    T::Output: 'static,
{
    type Output = T::Output;
    type Error = std::io::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = BoxFuture<'static, Result<T::Output, std::io::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let key = peer_ip(&addr);
        let dial = self.inner.dial(addr, opts)?;
        let refusals = self.refusals.clone();
        Ok(async move {
            let r = dial.await;
            match (&r, key) {
                (Err(e), Some(key)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    refusals.record(key)
                }
                (Ok(_), Some(key)) => refusals.accepted(&key),
                _ => {}
            }
            r
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// The QUIC transport, whose dials give up as soon as TCP to the same
/// peer at the same IP was refused (see the module doc).
#[cfg(feature = "quic")]
pub(crate) struct AbortOnRefusal<T> {
    inner: T,
    refusals: TcpRefusals,
}

#[cfg(feature = "quic")]
impl<T> AbortOnRefusal<T> {
    pub(crate) fn new(inner: T, refusals: TcpRefusals) -> Self {
        AbortOnRefusal { inner, refusals }
    }
}

#[cfg(feature = "quic")]
impl<T> Transport for AbortOnRefusal<T>
where
    T: Transport<Error = libp2p::quic::Error> + Unpin,
    T::Dial: Send + 'static,
    T::Output: 'static,
{
    type Output = T::Output;
    type Error = libp2p::quic::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = BoxFuture<'static, Result<T::Output, libp2p::quic::Error>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let key = peer_ip(&addr);
        let dial = self.inner.dial(addr, opts)?;
        let Some(key) = key else {
            return Ok(dial.boxed());
        };
        let refusals = self.refusals.clone();
        let started = Instant::now();
        Ok(async move {
            let refused = async {
                let mut tick = tokio::time::interval(REFUSAL_POLL);
                loop {
                    tick.tick().await;
                    if refusals.refused_since(&key, started) {
                        return;
                    }
                }
            };
            tokio::select! {
                r = dial => r,
                () = refused => Err(libp2p::quic::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("TCP to {} at {} was refused: no node there", key.0, key.1),
                ))),
            }
        }
        .boxed())
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_keyed_by_peer_and_ip_and_dated() {
        let peer = PeerId::random();
        let a: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}").parse().unwrap();
        let q: Multiaddr = format!("/ip4/127.0.0.1/udp/2/quic-v1/p2p/{peer}")
            .parse()
            .unwrap();
        assert_eq!(peer_ip(&a), peer_ip(&q));
        assert_eq!(peer_ip(&"/ip4/127.0.0.1/tcp/1".parse().unwrap()), None);
        let key = peer_ip(&a).unwrap();
        let r = TcpRefusals::default();
        let before = Instant::now();
        assert!(!r.refused_since(&key, before));
        r.record(key);
        assert!(r.refused_since(&key, before));
        // A recent refusal older than the dial still counts, until the
        // peer accepts a TCP connection.
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.refused_since(&key, Instant::now()));
        r.accepted(&key);
        assert!(!r.refused_since(&key, before));
        let other = (PeerId::random(), key.1);
        assert!(!r.refused_since(&other, before));
    }
}

/// Bytes written to this node's TCP connections (after noise, so what the
/// network carries), shared between the transport and the event loop's
/// statistics.
#[derive(Debug, Clone, Default)]
pub(crate) struct BytesSent(Arc<std::sync::atomic::AtomicU64>);

impl BytesSent {
    /// Total so far.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wraps one connection's raw stream so that its writes are counted.
    pub(crate) fn count<S>(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            sent: self.clone(),
        }
    }
}

/// A raw connection stream whose written bytes add to a [`BytesSent`].
#[derive(Debug)]
pub(crate) struct Counted<S> {
    inner: S,
    sent: BytesSent,
}

impl<S: futures::AsyncRead + Unpin> futures::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: futures::AsyncWrite + Unpin> futures::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.sent
                .0
                .fetch_add(*n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
