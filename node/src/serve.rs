//! A serving node: holds one range of a model, runs it in the engine, and
//! announces it on the swarm until told to leave.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nakshatra_swarm::{DeviceInfo, IdentityKeypair, Multiaddr, ServerInfo, SwarmConfig};

use std::sync::Arc;

use crate::engine::service::EngineService;
use crate::engine::{self, EngineConfig, SliceEngine};
use crate::hop::{spawn_servers, HopContext};
use crate::slices;

/// Errors of `node join`, each a clear message for the user.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The model file could not be read.
    #[error("cannot read model {path}: {source}")]
    Model {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nakshatra_slicer::SliceError,
    },
    /// The range does not fit the model (checked before any network use).
    #[error(
        "layers {start}..{end} are out of range: the model has {n_layers} layers (0..{n_layers})"
    )]
    Range {
        /// Asked start.
        start: u32,
        /// Asked end.
        end: u32,
        /// Layers of the model.
        n_layers: u32,
    },
    /// Slicing or the slice cache failed.
    #[error(transparent)]
    Cache(#[from] slices::CacheError),
    /// The engine could not load or measure the range.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// The node identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] nakshatra_swarm::IdentityError),
    /// The swarm could not start.
    #[error(transparent)]
    Swarm(#[from] nakshatra_swarm::SwarmError),
    /// The swarm stopped underneath us.
    #[error("the swarm event loop stopped")]
    Stopped,
    /// Announcing failed.
    #[error(transparent)]
    Announce(#[from] nakshatra_swarm::AnnounceError),
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
    /// Fetching the model from peers failed.
    #[error("{0}")]
    Fetch(String),
}

/// What `node join` needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Where the weights come from.
    pub source: ModelSource,
    /// Layers to serve.
    pub layers: LayerChoice,
    /// Memory for weights (`--layers auto`); default: 80% of free memory.
    pub max_memory: Option<u64>,
    /// Test-only fault injection.
    pub fault: Option<Fault>,
    /// Peers to bootstrap from.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Data directory (identity, slice cache).
    pub data_dir: PathBuf,
    /// mDNS discovery on the LAN.
    pub mdns: bool,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Announcement lifetime (every node of a swarm must use the same).
    pub record_ttl: Duration,
    /// Re-announce period.
    pub refresh: Duration,
    /// Test-only: delay added to every probe and activation frame (a slow
    /// link).
    pub test_link_delay: Option<Duration>,
    /// Sessions idle this long are closed and their KV freed.
    pub idle_timeout: Duration,
}

/// The identity file inside a data dir.
pub fn identity_path(data_dir: &Path) -> PathBuf {
    data_dir.join("identity.key")
}

/// Loads (or creates, mode 0600) this node's persistent identity.
pub fn load_identity(data_dir: &Path) -> Result<IdentityKeypair, JoinError> {
    Ok(nakshatra_swarm::load_or_create_identity(&identity_path(
        data_dir,
    ))?)
}

/// The devices llama.cpp sees, as the swarm announces them.
pub fn device_infos() -> Vec<DeviceInfo> {
    engine::devices()
        .into_iter()
        .map(|d| DeviceInfo {
            name: d.name,
            backend: d.backend,
            description: d.description,
            memory_total: d.memory_total as u64,
            memory_free: d.memory_free as u64,
        })
        .collect()
}

/// A node that is up: its engine and its swarm handle.
pub struct ServingNode {
    /// The range, running.
    pub engine: EngineService,
    /// The swarm handle.
    pub swarm: nakshatra_swarm::Client,
    /// The swarm's event loop task.
    pub task: tokio::task::JoinHandle<()>,
    /// What it announced last.
    pub info: ServerInfo,
    /// Dialable addresses, each ending in `/p2p/<peer id>`.
    pub addrs: Vec<Multiaddr>,
}

/// Which layers to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerChoice {
    /// These.
    Range(Range<u32>),
    /// Whatever the swarm needs most (`--layers auto`).
    Auto,
}

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local full GGUF.
    File(PathBuf),
    /// Only a model id: the pieces are fetched from peers.
    Id(String),
}

fn task_err(e: tokio::task::JoinError) -> JoinError {
    JoinError::Task(e.to_string())
}

/// The layer count of a GGUF, from its header alone.
fn block_count(path: &Path) -> Result<u32, nakshatra_slicer::SliceError> {
    use nakshatra_slicer::{MetaValue, SliceError};
    let g = nakshatra_slicer::Gguf::open(path)?;
    let arch = match g.get("general.architecture") {
        Some(MetaValue::String(a)) => a.clone(),
        _ => return Err(SliceError::MissingKey("general.architecture".into())),
    };
    nakshatra_slicer::supported_arch(&arch)?;
    let key = format!("{arch}.block_count");
    g.get(&key)
        .and_then(MetaValue::as_u32)
        .ok_or(SliceError::MissingKey(key))
}

/// Free memory of this host (MemAvailable), if it can be read.
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Prepares the range (slice or fetch, load, measure), starts the swarm,
/// serves pieces and sessions, and announces. With a local model and an
/// explicit range, everything that can fail on the user's input fails
/// before any network activity.
pub async fn start(opts: JoinOptions) -> Result<ServingNode, JoinError> {
    let keypair = match &opts.source {
        ModelSource::File(path) => {
            // Only the layer count is needed here: read the header, not
            // the weights (they are hashed once, in `prepare`).
            let n_layers = block_count(path).map_err(|source| JoinError::Model {
                path: path.clone(),
                source,
            })?;
            if let LayerChoice::Range(r) = &opts.layers {
                if r.start >= r.end || r.end > n_layers {
                    return Err(JoinError::Range {
                        start: r.start,
                        end: r.end,
                        n_layers,
                    });
                }
            }
            load_identity(&opts.data_dir)?
        }
        ModelSource::Id(id) => {
            nakshatra_swarm::protocol::validate_model_id(id)
                .map_err(|e| JoinError::Fetch(format!("bad model id {id:?}: {e}")))?;
            load_identity(&opts.data_dir)?
        }
    };
    let signing = nakshatra_swarm::signing_key(&keypair)?;
    let mut cfg = SwarmConfig::server();
    cfg.listen = opts.listen.clone();
    cfg.bootstrap = opts.bootstrap.clone();
    cfg.mdns = opts.mdns;
    cfg.record_ttl = opts.record_ttl;
    cfg.refresh = opts.refresh;
    cfg.test_link_delay = opts.test_link_delay;
    let (swarm, task) = nakshatra_swarm::spawn(keypair, cfg).await?;
    match prepare_and_announce(&opts, &swarm, &signing).await {
        Ok((engine, info, addrs)) => Ok(ServingNode {
            engine,
            swarm,
            task,
            info,
            addrs,
        }),
        Err(e) => {
            let _ = swarm.shutdown().await;
            let _ = task.await;
            Err(e)
        }
    }
}

/// The slice to serve and the files pieces are served from.
struct Prepared {
    slice: PathBuf,
    serve_files: Vec<PathBuf>,
    manifest: nakshatra_slicer::Manifest,
    vocab: Vec<u8>,
    range: Range<u32>,
}

async fn wait_for_model_peers(
    swarm: &nakshatra_swarm::Client,
    model_id: &str,
) -> Result<Vec<nakshatra_swarm::PeerId>, JoinError> {
    let t0 = std::time::Instant::now();
    loop {
        let connected = swarm
            .connected_peers()
            .await
            .map_err(|_| JoinError::Stopped)?;
        if !connected.is_empty() {
            let peers = swarm
                .model_peers(model_id)
                .await
                .map_err(|e| JoinError::Fetch(e.to_string()))?;
            let me = swarm.peer_id();
            let peers: Vec<_> = peers.into_iter().filter(|p| *p != me).collect();
            if !peers.is_empty() {
                return Ok(peers);
            }
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return Err(if connected.is_empty() {
                JoinError::Fetch("no peer reachable within 15 s: check --bootstrap".into())
            } else {
                JoinError::Fetch(format!(
                    "no peer serves model {model_id} (unknown model id?)"
                ))
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn prepare(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
) -> Result<Prepared, JoinError> {
    let budget = opts
        .max_memory
        .or_else(|| available_memory().map(|m| m / 10 * 8))
        .unwrap_or(u64::MAX);
    match &opts.source {
        ModelSource::File(path) => {
            let p = path.clone();
            let (manifest, vocab) =
                tokio::task::spawn_blocking(move || nakshatra_slicer::manifest_and_vocab(&p))
                    .await
                    .map_err(task_err)?
                    .map_err(|source| JoinError::Model {
                        path: path.clone(),
                        source,
                    })?;
            let range = match &opts.layers {
                LayerChoice::Range(r) => r.clone(),
                LayerChoice::Auto => auto_range(swarm, &manifest, budget).await?,
            };
            let (dir, p, r) = (opts.data_dir.clone(), path.clone(), range.clone());
            let (id, hashes) = (manifest.model_id.clone(), manifest.hashes());
            let slice = tokio::task::spawn_blocking(move || {
                slices::ensure_slice(&dir, &p, &id, &hashes, &r)
            })
            .await
            .map_err(task_err)??;
            Ok(Prepared {
                slice,
                serve_files: vec![path.clone()],
                manifest,
                vocab,
                range,
            })
        }
        ModelSource::Id(id) => {
            let peers = wait_for_model_peers(swarm, id).await?;
            let (manifest, vocab) =
                crate::fetch::manifest_and_vocab(swarm, &peers, id, &opts.data_dir)
                    .await
                    .map_err(|e| JoinError::Fetch(e.to_string()))?;
            let range = match &opts.layers {
                LayerChoice::Range(r) => {
                    if r.start >= r.end || r.end > manifest.n_layers {
                        return Err(JoinError::Range {
                            start: r.start,
                            end: r.end,
                            n_layers: manifest.n_layers,
                        });
                    }
                    r.clone()
                }
                LayerChoice::Auto => auto_range(swarm, &manifest, budget).await?,
            };
            let slice = fetch_slice(opts, swarm, &peers, &manifest, &vocab, &range).await?;
            let mut serve_files = vec![slice.clone()];
            if range.start == 0 && range.end < manifest.n_layers {
                serve_files.push(engine::sidecar_path(&slice));
            }
            Ok(Prepared {
                slice,
                serve_files,
                manifest,
                vocab,
                range,
            })
        }
    }
}

async fn auto_range(
    swarm: &nakshatra_swarm::Client,
    manifest: &nakshatra_slicer::Manifest,
    budget: u64,
) -> Result<Range<u32>, JoinError> {
    let view = swarm
        .model_view(&manifest.model_id)
        .await
        .map_err(|e| JoinError::Fetch(e.to_string()))?;
    let (range, why) =
        crate::fetch::choose_range(manifest, &view, budget).map_err(JoinError::Fetch)?;
    tracing::info!(
        "--layers auto chose {}..{} ({} MB of weights, budget {} MB): {why}",
        range.start,
        range.end,
        manifest.range_bytes(range.start, range.end) / 1_000_000,
        budget / 1_000_000
    );
    Ok(range)
}

/// The slice `range` from the cache (verified) or fetched from peers.
async fn fetch_slice(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
    peers: &[nakshatra_swarm::PeerId],
    manifest: &nakshatra_slicer::Manifest,
    vocab: &[u8],
    range: &Range<u32>,
) -> Result<PathBuf, JoinError> {
    let id = &manifest.model_id;
    let out = slices::slice_path(&opts.data_dir, id, range);
    let hashes = manifest.hashes();
    if out.exists() {
        let (o, i, h, r) = (out.clone(), id.clone(), hashes.clone(), range.clone());
        let ok = tokio::task::spawn_blocking(move || slices::verify_cached(&o, &i, &h, &r))
            .await
            .map_err(task_err)?;
        match ok {
            Ok(()) => {
                tracing::info!(path = %out.display(), "reusing verified cached slice");
                return Ok(out);
            }
            Err(why) => tracing::warn!(path = %out.display(), %why, "cached slice rejected"),
        }
    }
    let pieces = manifest
        .pieces_for_range(range.start, range.end)
        .map_err(|e| JoinError::Fetch(e.to_string()))?;
    // Peers holding the blocks we need, besides those serving the model.
    let mut sources: Vec<nakshatra_swarm::PeerId> = peers.to_vec();
    for b in range.clone() {
        if let Ok(h) = swarm.block_holders(id, b).await {
            for p in h {
                if !sources.contains(&p) && p != swarm.peer_id() {
                    sources.push(p);
                }
            }
        }
    }
    let dir = crate::fetch::model_dir(&opts.data_dir, id).join("pieces");
    let stats = crate::fetch::fetch_pieces(swarm, &sources, manifest, &pieces, &dir)
        .await
        .map_err(|e| {
            JoinError::Fetch(format!(
                "fetching layers {}..{}: {e}",
                range.start, range.end
            ))
        })?;
    tracing::info!(
        "fetched {:.1} MB in {:.2} s ({:.0} MB/s) from {} peer(s), {:.1} MB already verified on disk, {} corrupt piece(s) refetched",
        stats.bytes_fetched as f64 / 1e6,
        stats.seconds,
        stats.mb_per_s(),
        stats.sources,
        stats.bytes_reused as f64 / 1e6,
        stats.corrupt_pieces
    );
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| JoinError::Fetch(format!("{}: {e}", parent.display())))?;
    }
    let (m, v, d, o, r) = (
        manifest.clone(),
        vocab.to_vec(),
        dir.clone(),
        out.clone(),
        range.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let file =
            |p: &nakshatra_slicer::PieceId| d.join(format!("{}.bin", crate::fetch::piece_label(p)));
        nakshatra_slicer::write_slice_from_pieces(&m, &v, &file, r.start, r.end, &o)
    })
    .await
    .map_err(task_err)?
    .map_err(|e| JoinError::Fetch(format!("writing the slice: {e}")))?;
    // The slice (and its sidecar) now hold these bytes and are what this
    // node serves from: the pieces would only double the disk used.
    for p in &pieces {
        let _ = std::fs::remove_file(dir.join(format!("{}.bin", crate::fetch::piece_label(p))));
    }
    Ok(out)
}

async fn prepare_and_announce(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
    signing: &ed25519_dalek::SigningKey,
) -> Result<(EngineService, ServerInfo, Vec<Multiaddr>), JoinError> {
    let p = prepare(opts, swarm).await?;
    let range = p.range.clone();
    let (engine, throughput) = {
        let (slice, cfg) = (p.slice.clone(), opts.engine.clone());
        tokio::task::spawn_blocking(move || -> Result<_, JoinError> {
            let mut e = SliceEngine::load(&slice, None, &cfg)?;
            let tps = e.measure_decode(16)?;
            Ok((e, tps))
        })
        .await
        .map_err(task_err)??
    };
    tracing::info!(
        "layers {}..{} run at {throughput:.1} tokens/s (one-token decode steps)",
        range.start,
        range.end
    );
    let engine = EngineService::spawn(engine);

    let store = {
        let (m, files, key, fault, delay) = (
            p.manifest.clone(),
            p.serve_files.clone(),
            signing.clone(),
            (opts.fault == Some(Fault::CorruptPieces))
                .then_some(crate::fetch::ServeFault::CorruptPieces),
            opts.test_link_delay,
        );
        tokio::task::spawn_blocking(move || {
            crate::fetch::PieceStore::new(m, &key, &files, fault, delay)
        })
        .await
        .map_err(task_err)?
        .map_err(|e| JoinError::Fetch(e.to_string()))?
    };
    crate::fetch::spawn_piece_servers(&swarm.stream_control(), Arc::new(store))
        .map_err(JoinError::Task)?;
    let hashes = nakshatra_swarm::protocol::encode(&p.manifest.hashes())
        .map_err(|e| JoinError::Task(e.to_string()))?;
    let ctx = Arc::new(HopContext {
        engine: engine.clone(),
        control: swarm.stream_control(),
        swarm: swarm.clone(),
        me: swarm.peer_id(),
        model_id: p.manifest.model_id.clone(),
        vocab: Some((Arc::new(p.vocab.clone()), Arc::new(hashes))),
        delay: opts.test_link_delay,
        idle_timeout: opts.idle_timeout,
    });
    spawn_servers(ctx).map_err(JoinError::Task)?;

    let listen = swarm.listen_addrs().await.map_err(|_| JoinError::Stopped)?;
    let me = swarm.peer_id();
    let addrs: Vec<Multiaddr> = listen
        .iter()
        .map(|a| a.clone().with(libp2p_p2p(me)))
        .collect();
    let m = &p.manifest;
    let mut si = ServerInfo::new(
        m.model_id.clone(),
        m.arch.clone(),
        m.n_layers,
        range,
        m.n_embd,
    );
    si.devices = device_infos();
    si.throughput = throughput;
    si.free_sessions = engine.free_sessions() as u32;
    si.max_sessions = engine.max_sessions() as u32;
    si.context_per_session = engine.ctx_per_session();
    swarm.announce(si.clone()).await?;
    Ok((engine, si, addrs))
}

fn libp2p_p2p(peer: nakshatra_swarm::PeerId) -> nakshatra_swarm::Protocol<'static> {
    nakshatra_swarm::Protocol::P2p(peer)
}

impl ServingNode {
    /// Re-announces when the free session count changed.
    pub async fn refresh_capacity(&mut self) -> Result<(), JoinError> {
        let free = self.engine.free_sessions() as u32;
        if free != self.info.free_sessions {
            self.info.free_sessions = free;
            self.swarm.announce(self.info.clone()).await?;
        }
        Ok(())
    }

    /// Withdraws the announcements and stops the swarm.
    pub async fn leave(self) -> Result<(), JoinError> {
        let r = self.swarm.shutdown().await;
        let _ = self.task.await;
        r.map_err(|_| JoinError::Stopped)
    }
}

/// Faults a test can ask a serving node to commit (hidden CLI flag
/// `--fault`); never used in normal operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Keep publishing forged DHT records: another peer's info signed by a
    /// stranger's key, a tampered signed record claiming the whole model,
    /// an expired record, an oversized one and garbage.
    ForgeRecords,
    /// Serve pieces with a byte flipped in every chunk.
    CorruptPieces,
}

impl ServingNode {
    /// Publishes one round of bad records (see [`Fault::ForgeRecords`]).
    pub async fn forge_records(&self, data_dir: &Path) -> Result<usize, JoinError> {
        use nakshatra_swarm::protocol::{encode, keys, now_ms, SignedServerInfo};
        let me = self.swarm.peer_id();
        let my_key = nakshatra_swarm::signing_key(&load_identity(data_dir)?)?;
        let stranger = nakshatra_swarm::signing_key(&IdentityKeypair::generate_ed25519())?;
        let victims: Vec<_> = self
            .swarm
            .connected_peers()
            .await
            .map_err(|_| JoinError::Stopped)?
            .into_iter()
            .filter(|p| *p != me)
            .collect();
        let now = now_ms();
        let mut lie = self.info.clone();
        lie.start = 0;
        lie.end = lie.n_layers_total;
        lie.throughput = 1e9;
        lie.issued_at_ms = now;
        lie.expires_at_ms = now + 60_000;
        let payload = encode(&lie).unwrap_or_default();
        let version = lie.protocol_version;
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        for v in &victims {
            let key = keys::info_key(v);
            // A stranger's signature over a claim about the victim.
            records.push((
                key.clone(),
                SignedServerInfo::sign_raw(&stranger, version, payload.clone()).to_bytes(),
            ));
            // Our own valid signature, then one payload byte changed.
            let mut t = SignedServerInfo::sign_raw(&my_key, version, payload.clone());
            if let Some(b) = t.payload.last_mut() {
                *b ^= 0x5a;
            }
            records.push((key.clone(), t.to_bytes()));
            records.push((key.clone(), vec![0xab; 20 * 1024]));
            records.push((key, b"not a record at all".to_vec()));
        }
        // An expired record of our own, validly signed.
        let mut old = lie.clone();
        old.issued_at_ms = now.saturating_sub(600_000);
        old.expires_at_ms = now.saturating_sub(300_000);
        let old = encode(&old).unwrap_or_default();
        records.push((
            keys::info_key(&me),
            SignedServerInfo::sign_raw(&my_key, version, old).to_bytes(),
        ));
        let n = records.len();
        for (k, v) in records {
            let _ = self.swarm.put_raw_record(&k, v).await;
        }
        tracing::warn!("fault injection: published {n} forged records");
        Ok(n)
    }
}
