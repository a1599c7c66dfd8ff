//! What an asking process measures of its asks while they run, for the
//! API's `/metrics` (Prometheus types: each is a shared handle, cheap to
//! clone, read by the registry at scrape time).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds of the step-latency buckets, seconds: from a fast LAN
/// step (a few ms) to a slow internet chain (seconds).
pub const STEP_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Counters of one asking process, shared by its asks.
#[derive(Clone, Debug)]
pub struct AskMeters {
    /// Sessions this process holds open on chains now (a chain's, and
    /// `--verify`'s replica chains'): back to zero when every ask ended or
    /// was dropped.
    pub sessions_open: Gauge,
    /// Bytes on the asker's chain streams, by `direction`: `out` (steps
    /// written to first hops), `in` (tokens and replies read).
    pub bytes: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// `bytes{direction="out"}`.
    bytes_out: Counter,
    /// `bytes{direction="in"}`.
    bytes_in: Counter,
    /// Wall time of each decode step, seconds.
    pub step_seconds: Histogram,
}

impl Default for AskMeters {
    fn default() -> Self {
        let bytes: Family<Vec<(&'static str, &'static str)>, Counter> = Family::default();
        let bytes_out = bytes.get_or_create(&vec![("direction", "out")]).clone();
        let bytes_in = bytes.get_or_create(&vec![("direction", "in")]).clone();
        AskMeters {
            sessions_open: Gauge::default(),
            bytes,
            bytes_out,
            bytes_in,
            step_seconds: Histogram::new(STEP_BUCKETS),
        }
    }
}

/// One open session, counted in [`AskMeters::sessions_open`] for as long
/// as it lives.
#[derive(Debug)]
pub(crate) struct SessionGuard(Gauge);

impl SessionGuard {
    pub(crate) fn new(m: &AskMeters) -> Self {
        m.sessions_open.inc();
        SessionGuard(m.sessions_open.clone())
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A stream whose bytes are counted into [`AskMeters::bytes_in`] and
/// [`AskMeters::bytes_out`].
pub(crate) struct Metered<S> {
    inner: S,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, m: &AskMeters) -> Self {
        Metered {
            inner,
            bytes_in: m.bytes_in.clone(),
            bytes_out: m.bytes_out.clone(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.bytes_in.inc_by(*n as u64);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.bytes_out.inc_by(*n as u64);
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
