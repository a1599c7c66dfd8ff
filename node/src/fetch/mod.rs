//! Slices travel between peers: a model's signed manifest and its pieces
//! are served from the files a node holds, and a node that lacks a range
//! fetches its pieces from several peers in parallel, verified against the
//! manifest, resumable, written atomically.
//!
//! Peers are tried side by side, never one after another: every source
//! gets its streams at once (a dead or silent one costs its own timeouts,
//! in parallel with the others' work), a piece whose source stalls or
//! crawls is raced on another peer within seconds, and the last pieces in
//! flight are raced on idle peers (endgame). The first verified copy of a
//! piece is published; the others are cancelled and their files removed
//! (see `scheduler` for the thresholds).
//!
//! Pieces prefer direct connections: a peer reached only through a
//! circuit relay first gets [`DIRECT_WAIT`] for a hole punch to make it
//! direct, and is then ranked last (it fetches only what no direct source
//! can; see `scheduler`). When pieces must come through a relay, the user
//! is told once per peer (a line on stderr, [`FetchStats::relayed_peers`]).
//!
//! One file per job:
//! * [`server`]: `/nakshatra/manifest/1` and `/nakshatra/piece/1`, served
//!   from the mapped GGUF files ([`PieceStore`]).
//! * [`manifest`]: the verified manifest (cached, else raced across
//!   peers).
//! * `scheduler`: which piece goes to which peer next (and when a piece is
//!   raced), who lacks what, who served bad bytes, how fast each stream
//!   goes, progress; shared by every stream.
//! * `worker`: one stream to one peer, requests pipelined across pieces,
//!   bytes counted as they arrive.
//! * `writer`: one attempt's bytes: hash, write `.part` (or a race file),
//!   verify, publish as `.bin` if first.
//!
//! Files live in the data dir's [`crate::datadir::PieceDir`]; pieces
//! become a slice with `nakshatra_slicer::write_slice_from_pieces`, which
//! writes the same bytes as slicing the original file.

pub mod manifest;
mod scheduler;
pub mod server;
mod worker;
mod writer;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncWrite};

use nakshatra_slicer::{Manifest, PieceId, SliceError};
use nakshatra_swarm::PeerId;

use crate::datadir::PieceDir;

pub use manifest::{manifest_and_vocab, model_shape, shape_of, ManifestError};
pub use scheduler::{MAX_HEALTHY_ATTEMPTS, RATE_WINDOW, SLOW_FACTOR, STALL_TIMEOUT, WATCH_TICK};
pub use server::{spawn_piece_servers, PieceStore};

use scheduler::{Link, Meter, Scheduler};

/// Bytes asked for per piece request.
pub const CHUNK: u64 = 2 * 1024 * 1024;
/// Requests one stream keeps in flight, across piece boundaries.
pub const PIPELINE_DEPTH: usize = 4;
/// Streams a fetch opens to one peer.
pub const STREAMS_PER_PEER: usize = 2;
/// Times one peer may fail one piece, or one stream may fail to open, for
/// network reasons before the piece is left to the others.
pub const NET_RETRIES: u32 = 3;
/// How often the progress bar (or, without a terminal, the progress log
/// line's clock) is updated.
const PROGRESS_TICK: Duration = Duration::from_millis(200);
/// Least time between two progress log lines (no terminal).
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(2);
/// How long a source reached only through a relay is given, once
/// connected, to become direct (DCUtR punches a hole a few round trips
/// after the relayed connection opens; one that cannot succeed, behind a
/// symmetric NAT, takes seconds to fail) before its streams start on the
/// relay. Only that peer's streams wait: sources reached directly start
/// at once, and a relayed peer gets nothing they can take anyway.
pub const DIRECT_WAIT: Duration = Duration::from_secs(3);
/// How often the watchdog refreshes how each source is reached (a punch
/// may succeed later; a direct connection may be lost).
const LINK_REFRESH: Duration = Duration::from_secs(1);

/// Why a fetch of a range failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Pieces could not be had from any peer.
    #[error("piece {pieces} could not be fetched from any peer: {why}")]
    Piece {
        /// The pieces still missing, comma-separated.
        pieces: String,
        /// Why the first of them failed last.
        why: Box<PieceFailure>,
    },
    /// A local file could not be read or written (a full disk stops the
    /// whole fetch with this).
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error (`StorageFull` for a full disk).
        #[source]
        source: std::io::Error,
    },
    /// A piece asked for is not in the manifest.
    #[error("piece {0} is not in the manifest")]
    NotInManifest(PieceId),
    /// The slice could not be written from the pieces.
    #[error(transparent)]
    Slice(#[from] SliceError),
}

/// Why one attempt at one piece failed (the last such reason is what a
/// failed fetch reports).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PieceFailure {
    /// Nobody was asked (no peer left that might hold it).
    #[error("no peer has it")]
    NoHolder,
    /// The peer said it does not hold the piece.
    #[error("{0} does not hold it")]
    NotHere(PeerId),
    /// The peer answered a chunk of the wrong size: it is not asked again.
    #[error("{peer} answered {got} bytes of a {total}-byte piece for {asked} of {n_bytes}")]
    WrongLength {
        /// The peer.
        peer: PeerId,
        /// Bytes it sent.
        got: usize,
        /// The piece length it claimed.
        total: u64,
        /// Bytes asked for.
        asked: u64,
        /// The piece length in the manifest.
        n_bytes: u64,
    },
    /// The peer's bytes do not hash to the manifest's: it is not asked
    /// again.
    #[error("{peer}: {source}")]
    Corrupt {
        /// The peer.
        peer: PeerId,
        /// The hash mismatch.
        #[source]
        source: Arc<SliceError>,
    },
    /// Bytes resumed from an earlier run (maybe another peer's) did not
    /// verify: the piece starts over, nobody blamed.
    #[error("resumed bytes do not verify: {0}")]
    ResumeCorrupt(#[source] Arc<SliceError>),
    /// The stream to the peer broke, timed out or could not be opened.
    #[error("{peer}: {source}")]
    Network {
        /// The peer.
        peer: PeerId,
        /// What went wrong on the stream.
        #[source]
        source: Arc<worker::StreamTrouble>,
    },
}

/// Counters of one fetch, for the closing log line and the benchmark.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FetchStats {
    /// Bytes received from peers and verified.
    pub bytes_fetched: u64,
    /// Bytes of pieces already verified on disk (not fetched again).
    pub bytes_reused: u64,
    /// Pieces that failed verification (and were fetched again).
    pub corrupt_pieces: u32,
    /// Peers dropped for serving bad bytes (base58).
    pub bad_peers: Vec<String>,
    /// Wall time of the fetch, seconds.
    pub seconds: f64,
    /// Peers that served at least one verified piece.
    pub sources: usize,
    /// Times a piece was given to another stream because every stream
    /// fetching it stalled or crawled ([`STALL_TIMEOUT`], [`SLOW_FACTOR`]).
    pub raced_pieces: u32,
    /// Times an idle stream took a duplicate of a piece in flight at the
    /// end of the fetch (endgame).
    pub endgame_pieces: u32,
    /// Peers whose streams were found stalled or crawling (base58).
    pub slow_peers: Vec<String>,
    /// Bytes of verified pieces that came through a relay (a peer with no
    /// direct connection when the piece was claimed).
    pub relayed_bytes: u64,
    /// Verified pieces that came through a relay.
    pub relayed_pieces: u32,
    /// Peers that were given pieces while reached only through a relay
    /// (base58).
    pub relayed_peers: Vec<String>,
}

impl FetchStats {
    /// Throughput of the bytes fetched, MB/s.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes_fetched as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// Fetches every piece of `pieces` into `dir` from `peers` (all at once,
/// [`STREAMS_PER_PEER`] streams each), verifying each; pieces already
/// verified on disk are kept, partial ones resumed. Pieces whose sources
/// stall or crawl, and the last ones in flight, are raced across peers
/// (first verified copy wins). A local I/O error (a full disk) stops
/// everything at once; a peer that serves bad bytes gets no more
/// requests. Returns once every stream and writer has stopped, with no
/// race file left in `dir`.
pub async fn fetch_pieces(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    manifest: &Manifest,
    pieces: &[PieceId],
    dir: &PieceDir,
) -> Result<FetchStats, FetchError> {
    let io = |source| FetchError::Io {
        path: dir.path().to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir.path()).map_err(io)?;
    // Race files of a run that was killed are never resumed.
    writer::remove_race_files(dir);
    let t0 = Instant::now();
    let (queue, stats, total) = pieces_to_fetch(manifest, pieces, dir).await?;
    let n_jobs = queue.len();
    if n_jobs == 0 {
        return Ok(FetchStats {
            seconds: t0.elapsed().as_secs_f64(),
            ..stats
        });
    }
    let sched = Scheduler::new(queue, stats);
    let ticker = tokio::spawn(show_progress(sched.clone(), total, n_jobs));
    let watchdog = tokio::spawn(watch(sched.clone(), swarm.clone(), peers.to_vec()));
    let pool = writer::BufPool::default();
    let mut workers = tokio::task::JoinSet::new();
    for &peer in peers {
        let ws: Vec<worker::Worker> = (0..STREAMS_PER_PEER)
            .map(|_| {
                let (id, meter) = sched.add_worker(peer);
                worker::Worker {
                    swarm: swarm.clone(),
                    peer,
                    sched: sched.clone(),
                    manifest: manifest.clone(),
                    dir: dir.clone(),
                    pool: pool.clone(),
                    id,
                    meter,
                }
            })
            .collect();
        let swarm = swarm.clone();
        let sched_peer = sched.clone();
        workers.spawn(async move {
            // Connect once before opening streams in parallel (simultaneous
            // first dials to one peer can race each other); peers do not
            // wait for each other.
            let _ = swarm.probe_rtt(peer).await;
            settle_link(&swarm, &sched_peer, peer).await;
            futures::future::join_all(ws.into_iter().map(worker::Worker::run)).await;
        });
    }
    // Until every worker stopped, or every piece is in (streams still
    // waiting on a stalled peer are then dropped).
    loop {
        let changed = sched.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if sched.is_complete() {
            break;
        }
        tokio::select! {
            r = workers.join_next() => if r.is_none() { break },
            _ = changed => {}
        }
    }
    workers.abort_all();
    while workers.join_next().await.is_some() {}
    // Each writer ends its attempt once its worker is gone.
    sched.writers_done().await;
    ticker.abort();
    watchdog.abort();
    show_notices(&sched, None);
    writer::remove_race_files(dir);
    let stats = sched.finish(t0.elapsed())?;
    if !stats.slow_peers.is_empty() {
        tracing::info!(
            "{} piece(s) raced away from stalled or crawling peers ({}), {} raced at the end (first verified copy kept)",
            stats.raced_pieces,
            if stats.slow_peers.is_empty() {
                "none".to_string()
            } else {
                stats.slow_peers.join(", ")
            },
            stats.endgame_pieces
        );
    }
    if stats.relayed_pieces > 0 {
        tracing::info!(
            "{} piece(s), {:.1} MB, came through a relay from {}",
            stats.relayed_pieces,
            stats.relayed_bytes as f64 / 1e6,
            stats.relayed_peers.join(", ")
        );
    }
    Ok(stats)
}

/// How `via` says this node reaches `peer` now.
fn link_of(via: Option<nakshatra_swarm::Via>) -> Link {
    match via {
        Some(nakshatra_swarm::Via::Direct) => Link::Direct,
        Some(nakshatra_swarm::Via::Relay) => Link::Relayed,
        None => Link::Unreachable,
    }
}

/// Once `peer` was dialled: records how it is reached, after a hole
/// punch still under way to it has had up to [`DIRECT_WAIT`] to make it
/// direct ([`nakshatra_swarm::Client::wait_for_hole_punches`]; its streams
/// start after this, and a stream on a relayed connection would be closed
/// with it when a punch succeeds).
async fn settle_link(swarm: &nakshatra_swarm::Client, sched: &Scheduler, peer: PeerId) {
    swarm.wait_for_hole_punches(&[peer], DIRECT_WAIT).await;
    let via = swarm.via().await.ok().and_then(|v| v.get(&peer).copied());
    sched.set_link(peer, link_of(via));
}

/// The watchdog: [`Scheduler::watch`] every [`WATCH_TICK`], and every
/// [`LINK_REFRESH`] how each of `peers` that was dialled is reached now,
/// until aborted.
async fn watch(sched: Arc<Scheduler>, swarm: nakshatra_swarm::Client, peers: Vec<PeerId>) {
    let mut last_refresh = Instant::now();
    loop {
        tokio::time::sleep(WATCH_TICK).await;
        sched.watch();
        if last_refresh.elapsed() >= LINK_REFRESH {
            last_refresh = Instant::now();
            let Ok(via) = swarm.via().await else { continue };
            for p in &peers {
                // Not yet dialled ones are settled by their own task; a
                // peer with no connection now keeps its last state (its
                // streams redial it).
                if let (Some(v), true) = (via.get(p), sched.link(p) != Link::Unknown) {
                    sched.set_link(*p, link_of(Some(*v)));
                }
            }
        }
    }
}

/// Shows the scheduler's notices for the user (pieces through a relay):
/// a line each on stderr, above the progress bar if there is one.
fn show_notices(sched: &Scheduler, bar: Option<&indicatif::ProgressBar>) {
    for line in sched.take_notices() {
        match bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

/// A stream whose reads are counted on a [`Meter`] (the piece workers'
/// rates, the manifest requests' first byte).
struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> Metered<S> {
    fn new(inner: S, meter: Arc<Meter>) -> Self {
        Self { inner, meter }
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
            if *n > 0 {
                self.meter.add(*n);
            }
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Splits `pieces` into those already verified on disk (counted as
/// reused) and the queue to fetch; returns the queue, the stats so far
/// and the bytes to fetch.
async fn pieces_to_fetch(
    manifest: &Manifest,
    pieces: &[PieceId],
    dir: &PieceDir,
) -> Result<(Vec<PieceId>, FetchStats, u64), FetchError> {
    let mut stats = FetchStats::default();
    let mut queue = Vec::new();
    let mut total = 0u64;
    for id in pieces {
        let piece = manifest
            .piece(id)
            .ok_or(FetchError::NotInManifest(*id))?
            .clone();
        let bin = dir.bin(id);
        let n_bytes = piece.n_bytes;
        let verified = tokio::task::spawn_blocking(move || writer::verify_file(&bin, &piece))
            .await
            .unwrap_or(false);
        if verified {
            stats.bytes_reused += n_bytes;
        } else {
            let _ = std::fs::remove_file(dir.bin(id));
            total += n_bytes;
            queue.push(*id);
        }
    }
    Ok((queue, stats, total))
}

/// Shows the fetch's progress until aborted: a bar on a terminal, else a
/// log line every [`PROGRESS_LOG_EVERY`].
async fn show_progress(sched: Arc<Scheduler>, total: u64, n_jobs: usize) {
    let bar = progress_bar(total);
    let mut last_log = Instant::now();
    let _clear = ClearOnDrop(bar.clone());
    loop {
        tokio::time::sleep(PROGRESS_TICK).await;
        show_notices(&sched, bar.as_ref());
        let (bytes, done) = sched.progress();
        match &bar {
            Some(b) => b.set_position(bytes.min(total)),
            None if last_log.elapsed() > PROGRESS_LOG_EVERY => {
                tracing::info!(
                    "fetched {:.1} of {:.1} MB ({done}/{n_jobs} pieces)",
                    bytes as f64 / 1e6,
                    total as f64 / 1e6
                );
                last_log = Instant::now();
            }
            None => {}
        }
    }
}

/// Clears the progress bar when the progress task is aborted.
struct ClearOnDrop(Option<indicatif::ProgressBar>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "fetching {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style);
    }
    Some(b)
}
