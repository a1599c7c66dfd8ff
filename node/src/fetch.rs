//! Slices travel between peers: serving a model's manifest and pieces, and
//! fetching the pieces of a layer range from several peers in parallel,
//! verified against the manifest, resumable, written atomically.
//!
//! On disk (`<data dir>/models/<model id>/`):
//! * `manifest.bin`: the verified manifest (bincode), checked against the
//!   vocabulary-only GGUF cached in `<data dir>/vocab/`;
//! * `pieces/<piece>.bin`: a verified piece; `pieces/<piece>.part`: bytes of
//!   a piece still arriving (resumed from its length after a crash; hashed
//!   as a whole once complete).
//!
//! Pieces become a slice with `nakshatra_slicer::write_slice_from_pieces`,
//! which writes the same bytes as slicing the original file.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use nakshatra_slicer::{Manifest, PieceHasher, PieceId};
use nakshatra_swarm::protocol::fetch::{
    ManifestRequest, ManifestResponse, PieceRef, PieceRequest, PieceResponse, SignedBlob,
    MANIFEST_DOMAIN, MANIFEST_PROTOCOL, MAX_CHUNK_BYTES, MAX_MANIFEST_BYTES, PIECE_PROTOCOL,
};
use nakshatra_swarm::{PeerId, StreamProtocol};

use crate::net::{read_frame, read_frame_into, write_frame, write_frame_parts};

/// Bytes asked for per piece request.
pub const CHUNK: u64 = 2 * 1024 * 1024;
/// Requests one stream keeps in flight, across piece boundaries.
pub const PIPELINE_DEPTH: usize = 4;
/// Streams a fetch opens to one peer.
pub const STREAMS_PER_PEER: usize = 2;

/// Errors of fetching a range.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nobody serves the model.
    #[error("no peer serves model {0} (unknown model id?)")]
    UnknownModel(String),
    /// No usable manifest.
    #[error("no valid manifest for model {model}: {why}")]
    Manifest {
        /// The model.
        model: String,
        /// The last reason.
        why: String,
    },
    /// A piece could not be had from any peer.
    #[error("piece {piece} could not be fetched from any peer: {why}")]
    Piece {
        /// The piece.
        piece: String,
        /// The last reason.
        why: String,
    },
    /// Local files.
    #[error("{path}: {source}")]
    Io {
        /// The file or dir.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Slicer.
    #[error(transparent)]
    Slice(#[from] nakshatra_slicer::SliceError),
    /// Vocabulary.
    #[error("vocabulary: {0}")]
    Vocab(String),
    /// The swarm stopped.
    #[error("the swarm event loop stopped")]
    Stopped,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The wire name of a piece.
pub fn piece_ref(id: &PieceId) -> PieceRef {
    match id {
        PieceId::Block(i) => PieceRef::Block(*i),
        PieceId::Embd => PieceRef::Embd,
        PieceId::Head => PieceRef::Head,
        PieceId::Globals => PieceRef::Globals,
    }
}

fn piece_id(r: PieceRef) -> PieceId {
    match r {
        PieceRef::Block(i) => PieceId::Block(i),
        PieceRef::Embd => PieceId::Embd,
        PieceRef::Head => PieceId::Head,
        PieceRef::Globals => PieceId::Globals,
    }
}

/// A short file-name-safe label of a piece.
pub fn piece_label(id: &PieceId) -> String {
    match id {
        PieceId::Block(i) => format!("blk{i}"),
        PieceId::Embd => "embd".into(),
        PieceId::Head => "head".into(),
        PieceId::Globals => "globals".into(),
    }
}

/// Faults a test can make a piece server commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServeFault {
    /// Flip a byte in every chunk served.
    CorruptPieces,
}

/// What a node can hand out: its signed manifest and the GGUF files it
/// holds pieces in.
pub struct PieceStore {
    /// The model.
    pub model_id: String,
    /// Encoded `SignedBlob` of the manifest.
    pub signed_manifest: Vec<u8>,
    /// The manifest.
    pub manifest: Manifest,
    /// Files holding pieces, with the pieces each holds.
    pub files: Vec<(nakshatra_slicer::Gguf, Vec<PieceId>)>,
    /// Test-only fault.
    pub fault: Option<ServeFault>,
    /// Test-only: delay before each chunk (a slow link).
    pub delay: Option<Duration>,
}

impl PieceStore {
    /// A store over `files` (the full model, or a slice and its sidecar),
    /// signing the manifest with `key`.
    pub fn new(
        manifest: Manifest,
        key: &ed25519_dalek::SigningKey,
        paths: &[PathBuf],
        fault: Option<ServeFault>,
        delay: Option<Duration>,
    ) -> Result<Self, FetchError> {
        let payload = nakshatra_swarm::protocol::encode(&manifest)
            .map_err(|e| FetchError::Vocab(e.to_string()))?;
        let signed = SignedBlob::sign(key, MANIFEST_DOMAIN, payload);
        let signed_manifest = nakshatra_swarm::protocol::encode(&signed)
            .map_err(|e| FetchError::Vocab(e.to_string()))?;
        let mut files = Vec::new();
        for p in paths {
            let g = nakshatra_slicer::Gguf::open(p).map_err(nakshatra_slicer::SliceError::from)?;
            let held = nakshatra_slicer::pieces_held(&g, &manifest);
            files.push((g, held));
        }
        Ok(Self {
            model_id: manifest.model_id.clone(),
            signed_manifest,
            manifest,
            files,
            fault,
            delay,
        })
    }

    /// Bytes `offset..offset+len` of a piece, as slices of the mapped
    /// files (no copy), and the piece's length.
    fn parts(&self, id: &PieceId, offset: u64, len: u64) -> Option<(Vec<&[u8]>, u64)> {
        let piece = self.manifest.piece(id)?;
        let (g, _) = self.files.iter().find(|(_, held)| held.contains(id))?;
        let segs = nakshatra_slicer::piece_segments(g, piece).ok()?;
        let total = piece.n_bytes;
        let end = offset.saturating_add(len).min(total);
        let mut out = Vec::new();
        let mut at = 0u64;
        for s in segs {
            let (s0, s1) = (at, at + s.len() as u64);
            let (a, b) = (offset.max(s0), end.min(s1));
            if a < b {
                out.push(s.get((a - s0) as usize..(b - s0) as usize)?);
            }
            at = s1;
        }
        Some((out, total))
    }

    /// Reads one byte of every page of a range, so that sending it from the
    /// async runtime does not wait for the disk. `None`: not held.
    fn prefault(&self, id: &PieceId, offset: u64, len: u64) -> Option<()> {
        let (parts, _) = self.parts(id, offset, len)?;
        let mut x = 0u8;
        for p in parts {
            for b in p.iter().step_by(4096) {
                x ^= *b;
            }
        }
        std::hint::black_box(x);
        Some(())
    }

    /// Piece ids this node can serve.
    pub fn held(&self) -> HashSet<PieceId> {
        self.files
            .iter()
            .flat_map(|(_, h)| h.iter().cloned())
            .collect()
    }
}

/// Serves `/nakshatra/manifest/1` and `/nakshatra/piece/1` from `store`.
pub fn spawn_piece_servers(
    control: &nakshatra_swarm::stream::Control,
    store: Arc<PieceStore>,
) -> Result<(), String> {
    let mut control = control.clone();
    let mut manifests = control
        .accept(StreamProtocol::new(MANIFEST_PROTOCOL))
        .map_err(|e| e.to_string())?;
    let mut pieces = control
        .accept(StreamProtocol::new(PIECE_PROTOCOL))
        .map_err(|e| e.to_string())?;
    let s = store.clone();
    tokio::spawn(async move {
        while let Some((_peer, mut stream)) = manifests.next().await {
            let s = s.clone();
            tokio::spawn(async move {
                let req = tokio::time::timeout(
                    Duration::from_secs(10),
                    read_frame::<_, ManifestRequest>(&mut stream),
                )
                .await;
                if let Ok(Ok((req, _))) = req {
                    let r = if req.model_id == s.model_id {
                        write_frame(&mut stream, &ManifestResponse::Manifest, &s.signed_manifest)
                            .await
                    } else {
                        write_frame(&mut stream, &ManifestResponse::NotHere, &[]).await
                    };
                    if r.is_ok() {
                        let _ = stream.close().await;
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Some((peer, mut stream)) = pieces.next().await {
            let s = store.clone();
            tokio::spawn(async move {
                loop {
                    let req = tokio::time::timeout(
                        Duration::from_secs(60),
                        read_frame::<_, PieceRequest>(&mut stream),
                    )
                    .await;
                    let Ok(Ok((req, _))) = req else { break };
                    if let Some(d) = s.delay {
                        tokio::time::sleep(d).await;
                    }
                    let sent = if req.model_id != s.model_id {
                        write_frame(&mut stream, &PieceResponse::NotHere, &[]).await
                    } else if req.len > MAX_CHUNK_BYTES {
                        let resp = PieceResponse::Error {
                            message: format!("chunk of {} bytes over {MAX_CHUNK_BYTES}", req.len),
                        };
                        write_frame(&mut stream, &resp, &[]).await
                    } else {
                        let id = piece_id(req.piece);
                        let s2 = s.clone();
                        let held = tokio::task::spawn_blocking(move || {
                            s2.prefault(&id, req.offset, req.len)
                        })
                        .await
                        .ok()
                        .flatten()
                        .is_some();
                        match s.parts(&id, req.offset, req.len).filter(|_| held) {
                            Some((parts, total)) => {
                                let resp = PieceResponse::Data { total };
                                if s.fault == Some(ServeFault::CorruptPieces) {
                                    let mut data = parts.concat();
                                    let mid = data.len() / 2;
                                    if let Some(b) = data.get_mut(mid) {
                                        *b ^= 0xff;
                                    }
                                    write_frame(&mut stream, &resp, &data).await
                                } else {
                                    write_frame_parts(&mut stream, &resp, &parts).await
                                }
                            }
                            None => write_frame(&mut stream, &PieceResponse::NotHere, &[]).await,
                        }
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                tracing::debug!(%peer, "piece stream closed");
            });
        }
    });
    Ok(())
}

/// Where a model's fetched state lives.
pub fn model_dir(data_dir: &Path, model_id: &str) -> PathBuf {
    data_dir.join("models").join(model_id)
}

async fn request_manifest(
    swarm: &nakshatra_swarm::Client,
    peer: PeerId,
    model_id: &str,
) -> Result<Manifest, String> {
    let req = ManifestRequest {
        model_id: model_id.to_string(),
    };
    let (resp, payload): (ManifestResponse, Vec<u8>) = crate::net::request(
        swarm,
        peer,
        MANIFEST_PROTOCOL,
        &req,
        Duration::from_secs(30),
    )
    .await?;
    if resp != ManifestResponse::Manifest {
        return Err("has no manifest for this model".into());
    }
    let (_, body) = SignedBlob::verify(&payload, MANIFEST_DOMAIN, Some(&peer), MAX_MANIFEST_BYTES)
        .map_err(|e| format!("manifest signature: {e}"))?;
    nakshatra_swarm::protocol::decode(&body, MAX_MANIFEST_BYTES).map_err(|e| e.to_string())
}

/// The model's manifest and vocabulary, verified against `model_id`: each
/// from the data dir's cache when it verifies there (the vocabulary lives in
/// `node ask`'s cache, `vocab/<model id>.gguf`), else from peers.
pub async fn manifest_and_vocab(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    model_id: &str,
    data_dir: &Path,
) -> Result<(Manifest, Vec<u8>), FetchError> {
    let vocab_path = crate::ask::fetch_vocab(swarm, peers, model_id, data_dir)
        .await
        .map_err(|e| FetchError::Vocab(e.to_string()))?;
    let vocab = std::fs::read(&vocab_path).map_err(io(&vocab_path))?;
    let dir = model_dir(data_dir, model_id);
    let mpath = dir.join("manifest.bin");
    if let Ok(m) = std::fs::read(&mpath) {
        if let Ok(manifest) = nakshatra_swarm::protocol::decode::<Manifest>(&m, MAX_MANIFEST_BYTES)
        {
            if manifest.verify(model_id, &vocab).is_ok() {
                return Ok((manifest, vocab));
            }
        }
        tracing::warn!("cached manifest of {model_id} does not verify; fetching it again");
    }
    let mut why = String::from("no peer answered");
    for peer in peers {
        match request_manifest(swarm, *peer, model_id).await {
            Ok(m) => match m.verify(model_id, &vocab) {
                Ok(()) => {
                    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                    let bytes = nakshatra_swarm::protocol::encode(&m)
                        .map_err(|e| FetchError::Vocab(e.to_string()))?;
                    write_atomic(&mpath, &bytes)?;
                    return Ok((m, vocab));
                }
                Err(e) => {
                    tracing::warn!(%peer, "manifest does not match the model id: {e}");
                    why = format!("{peer}: {e}");
                }
            },
            Err(e) => {
                tracing::warn!(%peer, "manifest refused: {e}");
                why = format!("{peer}: {e}");
            }
        }
    }
    Err(FetchError::Manifest {
        model: model_id.to_string(),
        why,
    })
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename:
/// never a half-written file under the final name.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(io(path))
}

/// Hashes a file as a piece; true when it matches the manifest.
fn verify_file(path: &Path, piece: &nakshatra_slicer::Piece) -> bool {
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut h = PieceHasher::new(piece);
    let mut buf = vec![0u8; 4 << 20];
    loop {
        match std::io::Read::read(&mut f, &mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    h.finalize().is_ok()
}

/// Counters of one fetch, for the closing log line and the benchmark.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FetchStats {
    /// Bytes received from peers.
    pub bytes_fetched: u64,
    /// Bytes already verified on disk (not fetched again).
    pub bytes_reused: u64,
    /// Pieces that failed verification.
    pub corrupt_pieces: u32,
    /// Peers dropped for serving bad bytes.
    pub bad_peers: Vec<String>,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Peers that served pieces.
    pub sources: usize,
}

impl FetchStats {
    /// Throughput of the bytes fetched.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes_fetched as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

struct Shared {
    queue: VecDeque<PieceId>,
    /// Peers that lack a piece (answered NotHere).
    lacks: HashMap<PieceId, HashSet<PeerId>>,
    bad_peers: HashSet<PeerId>,
    served_by: HashSet<PeerId>,
    net_failures: HashMap<(PieceId, PeerId), u32>,
    last_error: HashMap<PieceId, String>,
    stats: FetchStats,
    done: usize,
    /// Pieces being fetched or written right now (they may come back to
    /// the queue).
    in_flight: usize,
    /// Bytes downloaded so far (progress).
    progress: u64,
    /// A local failure (disk full, cache unwritable): the fetch stops.
    local_error: Option<FetchError>,
    /// Woken whenever a piece comes back to the queue or leaves the
    /// fetch, so that idle workers look again at once.
    wake: Arc<tokio::sync::Notify>,
}

/// Receive buffers handed back by the piece writers, so that a chunk's
/// buffer is allocated (and its pages faulted in) once, not per chunk.
#[derive(Clone, Default)]
struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufPool {
    const KEEP: usize = 16;

    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default()
    }

    fn put(&self, buf: Vec<u8>) {
        if let Ok(mut v) = self.0.lock() {
            if v.len() < Self::KEEP {
                v.push(buf);
            }
        }
    }
}

/// Fetches every piece of `pieces` into `dir` from `peers` (several in
/// parallel), verifying each; pieces already verified on disk are kept,
/// partial ones resumed.
pub async fn fetch_pieces(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    manifest: &Manifest,
    pieces: &[PieceId],
    dir: &Path,
) -> Result<FetchStats, FetchError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let t0 = Instant::now();
    let mut stats = FetchStats::default();
    let mut queue = VecDeque::new();
    let mut total = 0u64;
    for id in pieces {
        let piece = manifest
            .piece(id)
            .ok_or_else(|| FetchError::Piece {
                piece: piece_label(id),
                why: "not in the manifest".into(),
            })?
            .clone();
        let bin = dir.join(format!("{}.bin", piece_label(id)));
        let ok = {
            let (b, p) = (bin.clone(), piece.clone());
            tokio::task::spawn_blocking(move || b.exists() && verify_file(&b, &p))
                .await
                .unwrap_or(false)
        };
        if ok {
            stats.bytes_reused += piece.n_bytes;
        } else {
            let _ = std::fs::remove_file(&bin);
            total += piece.n_bytes;
            queue.push_back(*id);
        }
    }
    let n_jobs = queue.len();
    if n_jobs == 0 {
        stats.seconds = t0.elapsed().as_secs_f64();
        return Ok(stats);
    }
    let shared = Arc::new(Mutex::new(Shared {
        queue,
        lacks: HashMap::new(),
        bad_peers: HashSet::new(),
        served_by: HashSet::new(),
        net_failures: HashMap::new(),
        last_error: HashMap::new(),
        stats,
        done: 0,
        in_flight: 0,
        progress: 0,
        local_error: None,
        wake: Arc::new(tokio::sync::Notify::new()),
    }));
    let bar = progress_bar(total);
    let ticker = {
        let (shared, bar) = (shared.clone(), bar.clone());
        tokio::spawn(async move {
            let mut last_log = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let (p, done) = match shared.lock() {
                    Ok(s) => (s.progress, s.done),
                    Err(_) => return,
                };
                match &bar {
                    Some(b) => b.set_position(p.min(total)),
                    None if last_log.elapsed() > Duration::from_secs(2) => {
                        tracing::info!(
                            "fetched {:.1} of {:.1} MB ({done}/{n_jobs} pieces)",
                            p as f64 / 1e6,
                            total as f64 / 1e6
                        );
                        last_log = Instant::now();
                    }
                    None => {}
                }
            }
        })
    };
    // Connect to every source once before opening streams in parallel
    // (simultaneous first dials to one peer can race each other).
    futures::future::join_all(peers.iter().map(|p| swarm.probe_rtt(*p))).await;
    let pool = BufPool::default();
    let workers: Vec<_> = peers
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, STREAMS_PER_PEER))
        .map(|p| {
            let ctx = WorkerCtx {
                swarm: swarm.clone(),
                peer: *p,
                shared: shared.clone(),
                manifest: manifest.clone(),
                dir: dir.to_path_buf(),
                pool: pool.clone(),
            };
            tokio::spawn(worker(ctx))
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    ticker.abort();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let mut s = shared.lock().map_err(|_| FetchError::Stopped)?;
    if let Some(e) = s.local_error.take() {
        return Err(e);
    }
    if s.done < n_jobs {
        let left: Vec<String> = s.queue.iter().map(piece_label).collect();
        let first = s.queue.front().cloned();
        let why = first
            .and_then(|f| s.last_error.get(&f).cloned())
            .unwrap_or_else(|| "no peer has it".into());
        return Err(FetchError::Piece {
            piece: if left.is_empty() {
                "?".into()
            } else {
                left.join(", ")
            },
            why,
        });
    }
    s.stats.seconds = t0.elapsed().as_secs_f64();
    s.stats.bad_peers = s.bad_peers.iter().map(ToString::to_string).collect();
    Ok(s.stats.clone())
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

enum Next {
    Job(PieceId),
    /// Nothing for this peer now, but pieces in flight may come back.
    Wait,
    Done,
}

/// Takes the next piece this peer may serve.
fn next_job(shared: &Mutex<Shared>, peer: &PeerId) -> Next {
    let Ok(mut s) = shared.lock() else {
        return Next::Done;
    };
    if s.bad_peers.contains(peer) || s.local_error.is_some() {
        return Next::Done;
    }
    let i = s
        .queue
        .iter()
        .position(|id| !s.lacks.get(id).is_some_and(|l| l.contains(peer)));
    match i.and_then(|i| s.queue.remove(i)) {
        Some(id) => {
            s.in_flight += 1;
            Next::Job(id)
        }
        None if s.in_flight > 0 => Next::Wait,
        None => Next::Done,
    }
}

/// Whether this peer's streams should stop (it served bad bytes, or the
/// fetch hit a local error).
fn should_stop(shared: &Mutex<Shared>, peer: &PeerId) -> bool {
    shared
        .lock()
        .map(|s| s.bad_peers.contains(peer) || s.local_error.is_some())
        .unwrap_or(true)
}

/// Records the first local failure; every worker stops.
fn local_failure(shared: &Mutex<Shared>, path: &Path, source: std::io::Error) {
    if let Ok(mut s) = shared.lock() {
        s.local_error.get_or_insert(FetchError::Io {
            path: path.to_path_buf(),
            source,
        });
        s.wake.notify_waiters();
    }
}

/// Puts a piece back for the other peers (this one will not get it again).
fn requeue(shared: &Mutex<Shared>, id: PieceId, peer: &PeerId, why: String) {
    if let Ok(mut s) = shared.lock() {
        s.in_flight = s.in_flight.saturating_sub(1);
        s.lacks.entry(id).or_default().insert(*peer);
        s.last_error.insert(id, why);
        s.queue.push_back(id);
        s.wake.notify_waiters();
    }
}

/// Network trouble with a peer: the piece goes back to the queue, and this
/// peer may try it again (a fresh stream) up to [`NET_RETRIES`] times.
fn requeue_transient(shared: &Mutex<Shared>, id: PieceId, peer: &PeerId, why: String) {
    if let Ok(mut s) = shared.lock() {
        let n = s.net_failures.entry((id, *peer)).or_default();
        *n += 1;
        let give_up = *n >= NET_RETRIES;
        s.in_flight = s.in_flight.saturating_sub(1);
        if give_up {
            s.lacks.entry(id).or_default().insert(*peer);
        }
        s.last_error.insert(id, why);
        s.queue.push_back(id);
        s.wake.notify_waiters();
    }
}

/// Times one peer may fail one piece for network reasons before it is
/// left to the others.
const NET_RETRIES: u32 = 3;

/// What one stream worker needs.
struct WorkerCtx {
    swarm: nakshatra_swarm::Client,
    peer: PeerId,
    shared: Arc<Mutex<Shared>>,
    manifest: Manifest,
    dir: PathBuf,
    pool: BufPool,
}

/// Messages from a stream worker to a piece's writer.
enum SinkMsg {
    /// The next bytes of the piece, in order: the first `.1` bytes of the
    /// buffer.
    Data(Vec<u8>, usize),
    /// Every byte was sent: verify, make durable, publish.
    Finish,
    /// The peer lacks the piece: it goes to the others.
    NotHere,
    /// The peer broke the protocol for this piece (wrong length): it is
    /// treated as a bad peer.
    Bad(String),
    /// The stream failed: the piece goes back to the queue. `discard`
    /// drops the bytes received so far (they came from a peer found bad).
    Abort { why: String, discard: bool },
}

/// A piece whose bytes are being requested and received on one stream.
struct Download {
    id: PieceId,
    n_bytes: u64,
    /// Next offset to ask for.
    requested: u64,
    /// Offset up to which answers came back.
    received: u64,
    /// Stopped asking (the peer lacks it or broke the protocol); answers
    /// still due are read and dropped.
    failed: bool,
    tx: tokio::sync::mpsc::Sender<SinkMsg>,
}

/// One stream to one peer. Requests are pipelined across piece boundaries
/// ([`PIPELINE_DEPTH`] chunks in flight); each piece's bytes go to its own
/// writer on a blocking thread, which hashes, writes, fsyncs and renames,
/// so the stream never waits for the disk.
async fn worker(ctx: WorkerCtx) {
    let mut stream: Option<nakshatra_swarm::Stream> = None;
    let mut failures = 0u32;
    let mut dropped_at_open = 0u32;
    let mut writers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    // Pieces under way on this worker; they survive a stream lost to
    // network trouble and continue, from the bytes received, on the next.
    let mut downloads: VecDeque<Download> = VecDeque::new();
    let mut why = format!("{}: stopped", ctx.peer);
    loop {
        if should_stop(&ctx.shared, &ctx.peer) {
            break;
        }
        let s = match stream.as_mut() {
            Some(s) => s,
            None => {
                match ctx
                    .swarm
                    .open_stream(ctx.peer, StreamProtocol::new(PIECE_PROTOCOL))
                    .await
                {
                    Ok(s) => stream.insert(s),
                    Err(e) => {
                        tracing::debug!(peer = %ctx.peer, "cannot open a piece stream: {e}");
                        why = format!("{}: {e}", ctx.peer);
                        failures += 1;
                        if failures >= NET_RETRIES {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
        };
        // Requests in flight on a lost stream are lost with it.
        downloads.retain(|d| !d.failed);
        for d in downloads.iter_mut() {
            d.requested = d.received;
        }
        match pump(&ctx, s, &mut downloads, &mut writers).await {
            Ok(()) => break,
            Err(e) => {
                tracing::debug!(peer = %ctx.peer, "network trouble: {}", e.why);
                why = format!("{}: {}", ctx.peer, e.why);
                stream = None;
                // A stream the peer dropped before answering anything (a
                // busy accept loop drops new streams) is reopened at once.
                if !e.answered && dropped_at_open < NET_RETRIES {
                    dropped_at_open += 1;
                    continue;
                }
                failures += 1;
                if failures >= NET_RETRIES {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Pieces still under way go back to the queue; their bytes are kept
    // for a resume, unless this peer served bad data.
    let discard = should_stop(&ctx.shared, &ctx.peer);
    for d in downloads.drain(..) {
        if !d.failed {
            let why = why.clone();
            let _ = d.tx.send(SinkMsg::Abort { why, discard }).await;
        }
    }
    for w in writers {
        let _ = w.await;
    }
}

/// Network trouble on a piece stream.
struct PumpError {
    why: String,
    /// Whether the peer had answered anything on this stream.
    answered: bool,
}

/// Keeps the stream busy until this peer has nothing left to give.
/// `Err` is network trouble; the pieces still in `downloads` are then the
/// caller's to continue on another stream or to abort.
async fn pump(
    ctx: &WorkerCtx,
    s: &mut nakshatra_swarm::Stream,
    downloads: &mut VecDeque<Download>,
    writers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), PumpError> {
    let mut answered = false;
    let fail = |answered: bool| move |why: String| PumpError { why, answered };
    let mut inflight: VecDeque<u64> = VecDeque::new();
    let wake = ctx
        .shared
        .lock()
        .map(|s| s.wake.clone())
        .map_err(|_| fail(answered)("fetch state poisoned".to_string()))?;
    loop {
        // Registered before looking at the queue: a change made after the
        // look wakes this worker.
        let changed = wake.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // Ask for more while the pipeline has room.
        let mut idle = false;
        while inflight.len() < PIPELINE_DEPTH {
            // Requests go out in download order: the first piece with bytes
            // not yet asked for (the last one, except right after a stream
            // was lost), else a new piece.
            let open = downloads
                .iter()
                .position(|d| !d.failed && d.requested < d.n_bytes);
            if open.is_none() {
                match next_job(&ctx.shared, &ctx.peer) {
                    Next::Job(id) => {
                        if let Some((d, w)) = start_download(ctx, id).await {
                            writers.push(w);
                            if d.requested >= d.n_bytes {
                                // Already complete on disk: only verify.
                                let _ = d.tx.send(SinkMsg::Finish).await;
                            } else {
                                downloads.push_back(d);
                            }
                        }
                        continue;
                    }
                    Next::Wait => {
                        idle = inflight.is_empty();
                        break;
                    }
                    Next::Done => {
                        if inflight.is_empty() {
                            return Ok(());
                        }
                        break;
                    }
                }
            }
            let Some(d) = open.and_then(|i| downloads.get_mut(i)) else {
                break;
            };
            let len = CHUNK.min(d.n_bytes - d.requested);
            let piece = ctx
                .manifest
                .piece(&d.id)
                .ok_or_else(|| fail(answered)("piece left the manifest".to_string()))?;
            send_request(s, &ctx.manifest.model_id, piece, d.requested, len)
                .await
                .map_err(fail(answered))?;
            d.requested += len;
            inflight.push_back(len);
        }
        if idle {
            // Nothing for this peer until a piece comes back or the last
            // ones are done (the timeout is only a safety net).
            let _ = tokio::time::timeout(Duration::from_millis(500), changed).await;
            continue;
        }
        let Some(len) = inflight.pop_front() else {
            continue;
        };
        let mut buf = ctx.pool.take();
        let (resp, n): (PieceResponse, usize) =
            tokio::time::timeout(Duration::from_secs(60), read_frame_into(s, &mut buf))
                .await
                .map_err(|_| fail(answered)("no data within 60 s".to_string()))?
                .map_err(|e| fail(answered)(e.to_string()))?;
        answered = true;
        let d = downloads
            .iter_mut()
            .find(|d| d.received < d.requested)
            .ok_or_else(|| fail(answered)("an answer nobody asked for".to_string()))?;
        d.received += len;
        if !d.failed {
            let msg = match resp {
                PieceResponse::Data { total } if total == d.n_bytes && n as u64 == len => {
                    if let Ok(mut sh) = ctx.shared.lock() {
                        sh.progress += len;
                    }
                    SinkMsg::Data(buf, n)
                }
                PieceResponse::Data { total } => {
                    d.failed = true;
                    SinkMsg::Bad(format!(
                        "answered {n} bytes of a {total}-byte piece for {len} of {}",
                        d.n_bytes
                    ))
                }
                PieceResponse::NotHere => {
                    d.failed = true;
                    SinkMsg::NotHere
                }
                PieceResponse::Error { message } => return Err(fail(answered)(message)),
            };
            // A closed writer hit a local error; `should_stop` sees it.
            let _ = d.tx.send(msg).await;
        }
        while downloads
            .front()
            .is_some_and(|d| d.received >= d.n_bytes || (d.failed && d.received >= d.requested))
        {
            if let Some(d) = downloads.pop_front() {
                if !d.failed {
                    let _ = d.tx.send(SinkMsg::Finish).await;
                }
            }
        }
        if should_stop(&ctx.shared, &ctx.peer) {
            // This peer served bad bytes, or the disk failed: the caller
            // drops what is still coming.
            return Ok(());
        }
    }
}

/// Starts the writer of piece `id` and learns how many bytes a previous
/// run left in its `.part` (the download resumes from there). `None`: a
/// local error (recorded) or a piece not in the manifest.
async fn start_download(
    ctx: &WorkerCtx,
    id: PieceId,
) -> Option<(Download, tokio::task::JoinHandle<()>)> {
    let Some(piece) = ctx.manifest.piece(&id).cloned() else {
        if let Ok(mut s) = ctx.shared.lock() {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        return None;
    };
    let n_bytes = piece.n_bytes;
    let (tx, rx) = tokio::sync::mpsc::channel(PIPELINE_DEPTH + 2);
    let (have_tx, have_rx) = tokio::sync::oneshot::channel();
    let w = PieceWriter {
        piece,
        dir: ctx.dir.clone(),
        peer: ctx.peer,
        shared: ctx.shared.clone(),
        pool: ctx.pool.clone(),
    };
    let handle = tokio::task::spawn_blocking(move || w.run(have_tx, rx));
    match have_rx.await {
        Ok(have) => Some((
            Download {
                id,
                n_bytes,
                requested: have,
                received: have,
                failed: false,
                tx,
            },
            handle,
        )),
        Err(_) => {
            let _ = handle.await;
            None
        }
    }
}

/// Receives one piece's bytes on a blocking thread: hashes while writing
/// `<piece>.part`, then verifies, fsyncs and renames it to `<piece>.bin`.
/// Every change of the piece's state in [`Shared`] happens here, after
/// the file is closed, so a requeued piece is never written twice at once.
struct PieceWriter {
    piece: nakshatra_slicer::Piece,
    dir: PathBuf,
    peer: PeerId,
    shared: Arc<Mutex<Shared>>,
    pool: BufPool,
}

impl PieceWriter {
    fn run(
        self,
        have_tx: tokio::sync::oneshot::Sender<u64>,
        mut rx: tokio::sync::mpsc::Receiver<SinkMsg>,
    ) {
        let label = piece_label(&self.piece.id);
        let id = self.piece.id;
        let part = self.dir.join(format!("{label}.part"));
        let bin = self.dir.join(format!("{label}.bin"));
        // Resume: what a previous run left in `.part` is hashed first (it
        // is only trusted once the whole piece verifies).
        let mut hasher = PieceHasher::new(&self.piece);
        let mut have = 0u64;
        if let Ok(prev) = std::fs::read(&part) {
            if (prev.len() as u64) <= self.piece.n_bytes {
                hasher.update(&prev);
                have = prev.len() as u64;
            }
        }
        let opened = if have > 0 {
            std::fs::OpenOptions::new().append(true).open(&part)
        } else {
            std::fs::File::create(&part)
        };
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => {
                local_failure(&self.shared, &part, e);
                return;
            }
        };
        if have_tx.send(have).is_err() {
            return;
        }
        let resumed = have > 0;
        let mut fetched = 0u64;
        let outcome = loop {
            match rx.blocking_recv() {
                Some(SinkMsg::Data(buf, n)) => {
                    let data = buf.get(..n).unwrap_or(&buf);
                    hasher.update(data);
                    if let Err(e) = file.write_all(data) {
                        drop(file);
                        let _ = std::fs::remove_file(&part);
                        local_failure(&self.shared, &part, e);
                        return;
                    }
                    fetched += data.len() as u64;
                    self.pool.put(buf);
                }
                Some(SinkMsg::Finish) => break None,
                Some(other) => break Some(other),
                None => {
                    break Some(SinkMsg::Abort {
                        why: format!("{}: stream dropped", self.peer),
                        discard: false,
                    })
                }
            }
        };
        drop(file);
        let unfetch = |sh: &mut Shared| sh.progress = sh.progress.saturating_sub(fetched);
        match outcome {
            None => {}
            Some(SinkMsg::NotHere) => {
                requeue(
                    &self.shared,
                    id,
                    &self.peer,
                    format!("{} does not hold it", self.peer),
                );
                return;
            }
            Some(SinkMsg::Bad(why)) => {
                let _ = std::fs::remove_file(&part);
                self.blame(&why, fetched);
                requeue(&self.shared, id, &self.peer, why);
                return;
            }
            Some(SinkMsg::Abort { why, discard }) => {
                if discard || have + fetched == 0 {
                    let _ = std::fs::remove_file(&part);
                    if let Ok(mut sh) = self.shared.lock() {
                        unfetch(&mut sh);
                    }
                }
                requeue_transient(&self.shared, id, &self.peer, why);
                return;
            }
            Some(SinkMsg::Data(..) | SinkMsg::Finish) => return,
        }
        if let Err(e) = hasher.finalize() {
            let _ = std::fs::remove_file(&part);
            let why = format!("{label}: {e}");
            if resumed {
                // Part of it came from an earlier attempt, maybe another
                // peer: nobody is blamed, the piece starts over.
                tracing::warn!(piece = %label, "resumed piece failed verification: {e}; fetching it again from the start");
                if let Ok(mut sh) = self.shared.lock() {
                    unfetch(&mut sh);
                }
                requeue_transient(&self.shared, id, &self.peer, why);
            } else {
                self.blame(&why, fetched);
                requeue(&self.shared, id, &self.peer, why);
            }
            return;
        }
        // Visible under its final name. No fsync: a `.bin` is trusted only
        // after hashing it again when a fetch starts, so a piece a power
        // cut truncated is fetched again, never used.
        let published = std::fs::rename(&part, &bin);
        if let Err(e) = published {
            let _ = std::fs::remove_file(&part);
            local_failure(&self.shared, &bin, e);
            return;
        }
        if let Ok(mut sh) = self.shared.lock() {
            sh.done += 1;
            sh.in_flight = sh.in_flight.saturating_sub(1);
            sh.stats.bytes_fetched += fetched;
            sh.served_by.insert(self.peer);
            sh.stats.sources = sh.served_by.len();
            sh.wake.notify_waiters();
        }
    }

    /// This peer served bytes that do not verify: it gets no more requests.
    fn blame(&self, why: &str, fetched: u64) {
        tracing::warn!(peer = %self.peer, piece = %piece_label(&self.piece.id), "piece failed verification: {why}; refetching it elsewhere and avoiding this peer");
        if let Ok(mut sh) = self.shared.lock() {
            sh.progress = sh.progress.saturating_sub(fetched);
            sh.stats.corrupt_pieces += 1;
            sh.bad_peers.insert(self.peer);
            sh.wake.notify_waiters();
        }
    }
}

async fn send_request(
    s: &mut nakshatra_swarm::Stream,
    model_id: &str,
    piece: &nakshatra_slicer::Piece,
    offset: u64,
    len: u64,
) -> Result<(), String> {
    let req = PieceRequest {
        model_id: model_id.to_string(),
        piece: piece_ref(&piece.id),
        offset,
        len,
    };
    write_frame(s, &req, &[]).await.map_err(|e| e.to_string())
}

/// Chooses a range for `--layers auto`: blocks nobody serves first, then
/// the blocks with the least announced throughput; as many contiguous
/// blocks as fit in `budget` bytes.
pub fn choose_range(
    manifest: &Manifest,
    view: &nakshatra_swarm::ModelView,
    budget: u64,
) -> Result<(Range<u32>, String), String> {
    let n = manifest.n_layers;
    // Throughput per block: sum over holders (0 when uncovered).
    let mut tput = vec![0f64; n as usize];
    for p in &view.peers {
        for b in p.range[0]..p.range[1].min(n) {
            tput[b as usize] += p.throughput.max(0.0);
        }
    }
    let fits = |start: u32, len: u32| manifest.range_bytes(start, start + len) <= budget;
    let best_len = |start: u32| -> u32 {
        let mut len = 0;
        while start + len < n && fits(start, len + 1) {
            len += 1;
        }
        len
    };
    // 1. The first uncovered block, as far as the gap and the budget go.
    if let Some(first_gap) = (0..n).find(|&b| tput[b as usize] == 0.0) {
        let max = best_len(first_gap);
        if max == 0 {
            return Err(format!(
                "block {first_gap} alone needs {} bytes, over the memory budget of {budget}",
                manifest.range_bytes(first_gap, first_gap + 1)
            ));
        }
        let mut len = 0;
        while len < max && tput[(first_gap + len) as usize] == 0.0 {
            len += 1;
        }
        let r = first_gap..first_gap + len;
        return Ok((
            r.clone(),
            format!(
                "blocks {}..{} have no holder; {} of them fit in the memory budget",
                r.start,
                (first_gap..n)
                    .find(|&b| tput[b as usize] > 0.0)
                    .unwrap_or(n),
                len
            ),
        ));
    }
    // 2. Everything covered: the window with the least throughput
    // (compared as sorted per-block throughputs, as Petals does).
    let mut best: Option<(Vec<f64>, Range<u32>)> = None;
    for start in 0..n {
        let len = best_len(start);
        if len == 0 {
            continue;
        }
        let mut key: Vec<f64> = (start..start + len).map(|b| tput[b as usize]).collect();
        key.sort_by(|a, b| a.total_cmp(b));
        let better = match &best {
            None => true,
            Some((k, _)) => key.partial_cmp(k) == Some(std::cmp::Ordering::Less),
        };
        if better {
            best = Some((key, start..start + len));
        }
    }
    best.map(|(k, r)| {
        (
            r,
            format!(
                "every block is served; this window has the least throughput (weakest block {:.1} tok/s)",
                k.first().copied().unwrap_or(0.0)
            ),
        )
    })
    .ok_or_else(|| format!("not even one block fits in the memory budget of {budget} bytes"))
}
