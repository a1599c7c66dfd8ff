//! Slices travel between peers: serving a model's manifest and pieces, and
//! fetching the pieces of a layer range from several peers in parallel,
//! verified against the manifest, resumable, written atomically.
//!
//! On disk (`<data dir>/models/<model id>/`):
//! * `manifest.bin`, `vocab.gguf`: the verified manifest (bincode) and the
//!   vocabulary-only GGUF it was checked with;
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

use crate::net::{read_frame, write_frame};

/// Bytes asked for per piece request.
pub const CHUNK: u64 = 4 * 1024 * 1024;
/// Streams (each with two requests in flight) a fetch opens to one peer.
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

    /// Bytes `offset..offset+len` of a piece, and the piece's length.
    fn read(&self, id: &PieceId, offset: u64, len: u64) -> Option<(Vec<u8>, u64)> {
        let piece = self.manifest.piece(id)?;
        let (g, _) = self.files.iter().find(|(_, held)| held.contains(id))?;
        let segs = nakshatra_slicer::piece_segments(g, piece).ok()?;
        let total = piece.n_bytes;
        let end = offset.saturating_add(len).min(total);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = 0u64;
        for s in segs {
            let (s0, s1) = (at, at + s.len() as u64);
            let (a, b) = (offset.max(s0), end.min(s1));
            if a < b {
                out.extend_from_slice(&s[(a - s0) as usize..(b - s0) as usize]);
            }
            at = s1;
        }
        Some((out, total))
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
                    let (resp, data) = if req.model_id != s.model_id {
                        (PieceResponse::NotHere, Vec::new())
                    } else if req.len > MAX_CHUNK_BYTES {
                        (
                            PieceResponse::Error {
                                message: format!(
                                    "chunk of {} bytes over {MAX_CHUNK_BYTES}",
                                    req.len
                                ),
                            },
                            Vec::new(),
                        )
                    } else {
                        let s2 = s.clone();
                        let id = piece_id(req.piece);
                        let read =
                            tokio::task::spawn_blocking(move || s2.read(&id, req.offset, req.len))
                                .await
                                .ok()
                                .flatten();
                        match read {
                            Some((mut data, total)) => {
                                if s.fault == Some(ServeFault::CorruptPieces) {
                                    let mid = data.len() / 2;
                                    if let Some(b) = data.get_mut(mid) {
                                        *b ^= 0xff;
                                    }
                                }
                                (PieceResponse::Data { total }, data)
                            }
                            None => (PieceResponse::NotHere, Vec::new()),
                        }
                    };
                    if write_frame(&mut stream, &resp, &data).await.is_err() {
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
    let mut s = swarm
        .open_stream(peer, StreamProtocol::new(MANIFEST_PROTOCOL))
        .await
        .map_err(|e| e.to_string())?;
    write_frame(
        &mut s,
        &ManifestRequest {
            model_id: model_id.to_string(),
        },
        &[],
    )
    .await
    .map_err(|e| e.to_string())?;
    let (resp, payload): (ManifestResponse, Vec<u8>) =
        tokio::time::timeout(Duration::from_secs(30), read_frame(&mut s))
            .await
            .map_err(|_| "no answer within 30 s".to_string())?
            .map_err(|e| e.to_string())?;
    if resp != ManifestResponse::Manifest {
        return Err("has no manifest for this model".into());
    }
    let (_, body) = SignedBlob::verify(&payload, MANIFEST_DOMAIN, Some(&peer), MAX_MANIFEST_BYTES)
        .map_err(|e| format!("manifest signature: {e}"))?;
    nakshatra_swarm::protocol::decode(&body, MAX_MANIFEST_BYTES).map_err(|e| e.to_string())
}

/// The model's manifest and vocabulary, verified against `model_id`: from
/// the data dir when cached there, else from peers.
pub async fn manifest_and_vocab(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    model_id: &str,
    data_dir: &Path,
) -> Result<(Manifest, Vec<u8>, PathBuf), FetchError> {
    let dir = model_dir(data_dir, model_id);
    let (mpath, vpath) = (dir.join("manifest.bin"), dir.join("vocab.gguf"));
    if let (Ok(m), Ok(v)) = (std::fs::read(&mpath), std::fs::read(&vpath)) {
        if let Ok(manifest) = nakshatra_swarm::protocol::decode::<Manifest>(&m, MAX_MANIFEST_BYTES)
        {
            if manifest.verify(model_id, &v).is_ok() {
                return Ok((manifest, v, vpath));
            }
        }
        tracing::warn!("cached manifest of {model_id} does not verify; fetching it again");
    }
    let vocab_path = crate::ask::fetch_vocab(swarm, peers, model_id, data_dir)
        .await
        .map_err(|e| FetchError::Vocab(e.to_string()))?;
    let vocab = std::fs::read(&vocab_path).map_err(io(&vocab_path))?;
    let mut why = String::from("no peer answered");
    for peer in peers {
        match request_manifest(swarm, *peer, model_id).await {
            Ok(m) => match m.verify(model_id, &vocab) {
                Ok(()) => {
                    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
                    let bytes = nakshatra_swarm::protocol::encode(&m)
                        .map_err(|e| FetchError::Vocab(e.to_string()))?;
                    write_atomic(&mpath, &bytes)?;
                    write_atomic(&vpath, &vocab)?;
                    return Ok((m, vocab, vpath));
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
    /// Pieces being fetched right now (they may come back to the queue).
    in_flight: usize,
    /// Bytes downloaded so far (progress).
    progress: u64,
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
    let workers: Vec<_> = peers
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, STREAMS_PER_PEER))
        .map(|p| {
            let (swarm, shared, manifest, dir, peer) = (
                swarm.clone(),
                shared.clone(),
                manifest.clone(),
                dir.to_path_buf(),
                *p,
            );
            tokio::spawn(async move { worker(swarm, peer, shared, manifest, dir).await })
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
    if s.bad_peers.contains(peer) {
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

fn finish_job(shared: &Mutex<Shared>) {
    if let Ok(mut s) = shared.lock() {
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

async fn worker(
    swarm: nakshatra_swarm::Client,
    peer: PeerId,
    shared: Arc<Mutex<Shared>>,
    manifest: Manifest,
    dir: PathBuf,
) {
    let mut stream: Option<nakshatra_swarm::Stream> = None;
    let mut failures = 0u32;
    loop {
        let id = match next_job(&shared, &peer) {
            Next::Job(id) => id,
            Next::Wait => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Next::Done => return,
        };
        let Some(piece) = manifest.piece(&id).cloned() else {
            finish_job(&shared);
            continue;
        };
        if stream.is_none() {
            match swarm
                .open_stream(peer, StreamProtocol::new(PIECE_PROTOCOL))
                .await
            {
                Ok(s) => stream = Some(s),
                Err(e) => {
                    requeue_transient(&shared, id, &peer, format!("{peer}: {e}"));
                    failures += 1;
                    if failures >= NET_RETRIES {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(s) = stream.as_mut() else {
            requeue(&shared, id, &peer, "no stream".into());
            return;
        };
        match fetch_one(s, &manifest.model_id, &piece, &dir, &shared).await {
            Ok(n) => {
                if let Ok(mut sh) = shared.lock() {
                    sh.done += 1;
                    sh.in_flight = sh.in_flight.saturating_sub(1);
                    sh.stats.bytes_fetched += n;
                    sh.served_by.insert(peer);
                    sh.stats.sources = sh.served_by.len();
                }
            }
            Err(PieceFail::NotHere) => {
                requeue(&shared, id, &peer, format!("{peer} does not hold it"))
            }
            Err(PieceFail::Corrupt(why)) => {
                tracing::warn!(%peer, piece = %piece_label(&id), "piece failed verification: {why}; refetching it elsewhere and avoiding this peer");
                if let Ok(mut sh) = shared.lock() {
                    sh.stats.corrupt_pieces += 1;
                    sh.bad_peers.insert(peer);
                }
                requeue(&shared, id, &peer, why);
                return;
            }
            Err(PieceFail::Net(why)) => {
                tracing::debug!(%peer, piece = %piece_label(&id), "network trouble: {why}");
                requeue_transient(&shared, id, &peer, format!("{peer}: {why}"));
                stream = None;
                failures += 1;
                if failures >= NET_RETRIES {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Puts a piece back for the other peers (this one will not get it again).
fn requeue(shared: &Mutex<Shared>, id: PieceId, peer: &PeerId, why: String) {
    if let Ok(mut s) = shared.lock() {
        s.in_flight = s.in_flight.saturating_sub(1);
        s.lacks.entry(id).or_default().insert(*peer);
        s.last_error.insert(id, why);
        s.queue.push_back(id);
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
    }
}

/// Times one peer may fail one piece for network reasons before it is
/// left to the others.
const NET_RETRIES: u32 = 3;

enum PieceFail {
    NotHere,
    Corrupt(String),
    Net(String),
}

async fn fetch_one(
    s: &mut nakshatra_swarm::Stream,
    model_id: &str,
    piece: &nakshatra_slicer::Piece,
    dir: &Path,
    shared: &Mutex<Shared>,
) -> Result<u64, PieceFail> {
    let label = piece_label(&piece.id);
    let part = dir.join(format!("{label}.part"));
    let bin = dir.join(format!("{label}.bin"));
    let net = |e: std::io::Error| PieceFail::Net(format!("{}: {e}", part.display()));
    // Resume: what a previous run left in `.part` is hashed first (it is
    // only trusted once the whole piece verifies).
    let mut hasher = PieceHasher::new(piece);
    let mut have = 0u64;
    if let Ok(prev) = std::fs::read(&part) {
        if (prev.len() as u64) <= piece.n_bytes {
            hasher.update(&prev);
            have = prev.len() as u64;
        }
    }
    let mut file = if have > 0 {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&part)
            .map_err(net)?
    } else {
        std::fs::File::create(&part).map_err(net)?
    };
    let mut fetched = 0u64;
    // Two requests in flight: the next chunk is on its way while this one
    // is hashed and written.
    let mut asked = have;
    let mut inflight: VecDeque<u64> = VecDeque::new();
    while asked < piece.n_bytes && inflight.len() < 2 {
        let len = CHUNK.min(piece.n_bytes - asked);
        send_request(s, model_id, piece, asked, len).await?;
        inflight.push_back(len);
        asked += len;
    }
    while let Some(len) = inflight.pop_front() {
        let (resp, data): (PieceResponse, Vec<u8>) =
            tokio::time::timeout(Duration::from_secs(60), read_frame(s))
                .await
                .map_err(|_| PieceFail::Net("no data within 60 s".into()))?
                .map_err(|e| PieceFail::Net(e.to_string()))?;
        match resp {
            PieceResponse::Data { total } if total == piece.n_bytes && data.len() as u64 == len => {
            }
            PieceResponse::Data { .. } => return Err(PieceFail::Corrupt("wrong length".into())),
            PieceResponse::NotHere => return Err(PieceFail::NotHere),
            PieceResponse::Error { message } => return Err(PieceFail::Net(message)),
        }
        if asked < piece.n_bytes {
            let next = CHUNK.min(piece.n_bytes - asked);
            send_request(s, model_id, piece, asked, next).await?;
            inflight.push_back(next);
            asked += next;
        }
        hasher.update(&data);
        file.write_all(&data).map_err(net)?;

        fetched += len;
        if let Ok(mut sh) = shared.lock() {
            sh.progress += len;
        }
    }
    drop(file);
    if let Err(e) = hasher.finalize() {
        let _ = std::fs::remove_file(&part);
        if let Ok(mut sh) = shared.lock() {
            sh.progress = sh.progress.saturating_sub(fetched);
        }
        return Err(PieceFail::Corrupt(format!("{label}: {e}")));
    }
    // Durable, then visible under its final name; off the download path.
    let (p, b) = (part.clone(), bin.clone());
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&p, &b))
    })
    .await
    .map_err(|e| PieceFail::Net(e.to_string()))?
    .map_err(|e| PieceFail::Net(format!("{}: {e}", bin.display())))?;
    Ok(fetched)
}

async fn send_request(
    s: &mut nakshatra_swarm::Stream,
    model_id: &str,
    piece: &nakshatra_slicer::Piece,
    offset: u64,
    len: u64,
) -> Result<(), PieceFail> {
    let req = PieceRequest {
        model_id: model_id.to_string(),
        piece: piece_ref(&piece.id),
        offset,
        len,
    };
    write_frame(s, &req, &[])
        .await
        .map_err(|e| PieceFail::Net(e.to_string()))
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
