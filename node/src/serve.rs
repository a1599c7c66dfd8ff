//! `node join`: a serving node holds one range of a model, runs it in the
//! engine, serves its pieces, vocabulary and sessions, and announces it on
//! the swarm until told to leave.
//!
//! The steps, in order: check the user's input (before any network use),
//! start the swarm (listening on TCP and QUIC, see
//! [`nakshatra_swarm::with_quic_listeners`]), choose the model when none
//! was named ([`crate::choose`]), [`prepare`] the slice (cut from a local
//! model, or fetched from peers), load and measure it, start the servers,
//! announce.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nakshatra_slicer::{Manifest, PieceId, SliceError};
use nakshatra_swarm::{
    DeviceInfo, IdentityKeypair, Multiaddr, PeerId, Protocol, ServerInfo, SwarmConfig,
};

use crate::choose::{self, ChooseError, ModelChoice};
use crate::datadir::DataDir;
use crate::engine::service::EngineService;
use crate::engine::{self, EngineConfig, SliceEngine};
use crate::faults::Faults;
use crate::fetch::{self, FetchError, ManifestError, PieceStore};
use crate::hop::{self, HopContext};
use crate::placement::{self, PlacementError};
use crate::slices::{self, CacheError};
use crate::vocab::{self, VocabError, VocabOffer};

/// How long a node joining with a model id waits for a first peer, and
/// then for a peer that serves the model.
pub const PEER_WAIT: Duration = Duration::from_secs(15);
/// How often it looks for the model's servers meanwhile.
const MODEL_POLL: Duration = Duration::from_millis(250);
/// How long a node joining with no model named reads the swarm's view,
/// once connected, for a model to serve before it gives up (the swarm
/// serves none): a few DHT round trips.
pub const CHOOSE_WAIT: Duration = Duration::from_secs(5);
/// How often it reads the view meanwhile (each read is a round of DHT
/// lookups).
const CHOOSE_POLL: Duration = Duration::from_secs(1);
/// Least time between two announcements of a changed free session count,
/// unless the node filled up or got room again.
pub const CAPACITY_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Decode steps timed to measure the announced throughput.
const MEASURE_STEPS: u32 = 16;
/// Share of free memory `--layers auto` uses when `--max-memory` is not
/// given, in tenths.
const AUTO_MEMORY_TENTHS: u64 = 8;

/// Errors of `node join`, each a clear message for the user.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// `--model-id` named no one model in the swarm.
    #[error(transparent)]
    Named(#[from] nakshatra_swarm::ResolveError),
    /// The model file could not be read.
    #[error("cannot read model {path}: {source}")]
    Model {
        /// The model file given with `--model`.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: SliceError,
    },
    /// The fetched model's family cannot serve this range exactly
    /// (checked before any piece is fetched).
    #[error("{source} (model {model_id})")]
    RefusedRange {
        /// The model.
        model_id: String,
        /// Why ([`SliceError::RangeRefused`] says which rule).
        #[source]
        source: SliceError,
    },
    /// The model's family cannot serve this range exactly (checked before
    /// any network use).
    #[error("{source} ({path})")]
    Refused {
        /// The model file given with `--model`.
        path: PathBuf,
        /// Why ([`SliceError::RangeRefused`] says which rule).
        #[source]
        source: SliceError,
    },
    /// The range does not fit the model (checked before any network use
    /// when the model is local).
    #[error(
        "layers {start}..{end} are out of range: the model has {n_layers} layers (0..{n_layers})"
    )]
    Range {
        /// First layer asked for.
        start: u32,
        /// One past the last layer asked for.
        end: u32,
        /// Layers of the model.
        n_layers: u32,
    },
    /// `--model-id` is not a model id.
    #[error("bad model id {id:?}: {source}")]
    BadModelId {
        /// What was given.
        id: String,
        /// Why it is not an id.
        #[source]
        source: nakshatra_swarm::protocol::RecordError,
    },
    /// Slicing or the slice cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
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
    #[error(transparent)]
    Stopped(#[from] nakshatra_swarm::Stopped),
    /// No peer reachable.
    #[error(transparent)]
    NoPeers(#[from] nakshatra_swarm::WaitError),
    /// A DHT lookup failed.
    #[error(transparent)]
    Lookup(#[from] nakshatra_swarm::LookupError),
    /// Peers are reachable, but none serves the model.
    #[error("no peer serves model {0} (unknown model id?)")]
    UnknownModel(String),
    /// No model named, and none to choose from the swarm.
    #[error(transparent)]
    Choose(#[from] ChooseError),
    /// Announcing failed.
    #[error(transparent)]
    Announce(#[from] nakshatra_swarm::AnnounceError),
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// No verified manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// `--layers auto` found nothing that fits.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// Fetching the range's pieces failed.
    #[error("fetching layers {}..{}: {source}", range.start, range.end)]
    Fetch {
        /// The range being fetched.
        range: Range<u32>,
        /// What went wrong.
        #[source]
        source: FetchError,
    },
    /// The slice could not be written from the fetched pieces.
    #[error("writing the slice: {0}")]
    WriteSlice(#[source] SliceError),
    /// The cache folder for the fetched slice could not be made.
    #[error("{path}: {source}")]
    SliceDir {
        /// The folder.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The piece store could not be built.
    #[error(transparent)]
    Store(#[from] fetch::server::StoreError),
    /// A protocol could not be served.
    #[error(transparent)]
    Serve(#[from] fetch::server::ServeError),
    /// The vocabulary could not be had or offered.
    #[error(transparent)]
    Vocab(#[from] VocabError),
    /// A stream protocol was registered twice.
    #[error("cannot serve a stream protocol: {0}")]
    Protocol(#[from] nakshatra_swarm::stream::AlreadyRegistered),
}

/// What `node join` needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Where the weights come from.
    pub source: ModelSource,
    /// Layers to serve.
    pub layers: LayerChoice,
    /// Bytes of weights `--layers auto` may take; default: 80% of free
    /// memory.
    pub max_memory: Option<u64>,
    /// Test-only faults (empty in a production build).
    pub faults: Faults,
    /// Peers to bootstrap from.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to listen on; each TCP one also gets QUIC on the same
    /// port number unless one of them is QUIC
    /// ([`nakshatra_swarm::with_quic_listeners`]).
    pub listen: Vec<Multiaddr>,
    /// The direct-stream port (`--direct-port`, `None`: `--no-direct`;
    /// see [`SwarmConfig::direct_port`]).
    pub direct_port: Option<u16>,
    /// Addresses this node is reachable at from the internet
    /// (`--external-addr`; see [`SwarmConfig::external_addrs`]).
    pub external_addrs: Vec<Multiaddr>,
    /// Relays to reserve a slot on (`--relay`; see
    /// [`SwarmConfig::relays`]).
    pub relays: Vec<Multiaddr>,
    /// Identity, slice cache, fetched pieces, vocabularies.
    pub data_dir: DataDir,
    /// mDNS discovery on the LAN.
    pub mdns: bool,
    /// Threads, sessions and context of the engine.
    pub engine: EngineConfig,
    /// Announcement lifetime (every node of a swarm must use the same).
    pub record_ttl: Duration,
    /// Re-announce period.
    pub refresh: Duration,
    /// Sessions idle this long are closed and their KV freed.
    pub idle_timeout: Duration,
    /// Sessions idle this long give their slot up to a new session that
    /// finds none free (a keep-alive cannot hold a slot for ever).
    pub evict_idle_after: Duration,
    /// With `--layers auto`: how the node moves to where the swarm needs
    /// it once it serves (`None`: it never moves).
    pub rebalance: Option<RebalanceOptions>,
    /// Where every step's timings go (`--trace-steps`), if anywhere.
    pub trace: Option<Arc<crate::trace::StepTrace>>,
}

/// How a `--layers auto` node rebalances ([`placement::Rebalancer`]).
#[derive(Debug, Clone)]
pub struct RebalanceOptions {
    /// Time between two checks of the swarm's balance.
    pub period: Duration,
    /// Least time a range is kept before the node may move again
    /// ([`placement::MIN_DWELL`] by default).
    pub min_dwell: Duration,
}

/// Which layers to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerChoice {
    /// These (`--layers A..B`).
    Range(Range<u32>),
    /// Whatever the swarm needs most (`--layers auto`).
    Auto,
}

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local full GGUF (`--model`).
    File(PathBuf),
    /// Only a model id (`--model-id`): the pieces are fetched from peers.
    Id(String),
    /// A model named as `swarm status` shows it (`--model-id
    /// smollm2:135m`: a name, a name's base, an id prefix;
    /// [`nakshatra_swarm::SwarmView::resolve`]), then as
    /// [`ModelSource::Id`].
    Named(String),
    /// Nothing named: the model the swarm needs most
    /// ([`choose::choose_model`]), then as [`ModelSource::Id`].
    Swarm,
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
    /// The model chosen from the swarm, and why ([`ModelSource::Swarm`]
    /// only).
    pub chosen: Option<ModelChoice>,
    /// Dialable addresses, each ending in `/p2p/<peer id>`.
    pub addrs: Vec<Multiaddr>,
    /// Its sessions (to count the evictable ones as free).
    pub sessions: Arc<hop::SessionTable>,
    /// See [`JoinOptions::evict_idle_after`].
    pub evict_idle_after: Duration,
    /// When the capacity was last announced.
    pub capacity_at: std::time::Instant,
    /// The range's accept loops (pieces, manifest, sessions): stopped and
    /// started anew by a move.
    servers: Vec<nakshatra_swarm::Served>,
    /// The engine as others in this process see it (the API's
    /// `/metrics`): follows moves, so nothing holds an old range's weights
    /// once its sessions are over.
    engine_tx: tokio::sync::watch::Sender<EngineService>,
    /// What moving needs (`--layers auto` with rebalancing on).
    mover: Option<Mover>,
}

/// A `--layers auto` node's means to move to another range.
struct Mover {
    opts: JoinOptions,
    signing: ed25519_dalek::SigningKey,
    manifest: Manifest,
    vocab: Vec<u8>,
    rules: Option<nakshatra_slicer::RangeRules>,
    budget: u64,
    rebalancer: placement::Rebalancer,
    period: Duration,
    next_check: Instant,
}

/// Loads (or creates, mode 0600) this node's persistent identity.
pub fn load_identity(data_dir: &DataDir) -> Result<IdentityKeypair, JoinError> {
    Ok(nakshatra_swarm::load_or_create_identity(
        &data_dir.identity_key(),
    )?)
}

/// The devices llama.cpp sees, as the swarm announces them: with a
/// device chosen (`--device`), that one and the CPU only (the other GPUs
/// of the host are other nodes' to announce).
pub fn device_infos(chosen: Option<&str>) -> Vec<DeviceInfo> {
    engine::devices()
        .into_iter()
        .filter(|d| chosen.is_none_or(|c| d.name.eq_ignore_ascii_case(c) || d.backend == "CPU"))
        .map(|d| DeviceInfo {
            features: if d.backend == "CPU" {
                engine::cpu_features()
            } else {
                Vec::new()
            },
            name: d.name,
            backend: d.backend,
            description: d.description,
            memory_total: d.memory_total as u64,
            memory_free: d.memory_free as u64,
        })
        .collect()
}

/// What `--layers auto` may take without `--max-memory`: a share
/// ([`AUTO_MEMORY_TENTHS`]) of the free memory of the GPUs every layer is
/// offloaded to, or of the host's when layers stay on the CPU (some or
/// all of them: a partial offload is sized as if none were).
fn default_budget(cfg: &EngineConfig) -> Option<u64> {
    let gpus = if cfg.gpu_layers < 0 {
        engine::offload_devices(cfg).unwrap_or_default()
    } else {
        Vec::new()
    };
    let free = if gpus.is_empty() {
        available_memory()?
    } else {
        gpus.iter().map(|d| d.memory_free as u64).sum()
    };
    Some(free / 10 * AUTO_MEMORY_TENTHS)
}

/// Free memory of this host (`MemAvailable`), if it can be read.
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
    check_input(&opts)?;
    let keypair = load_identity(&opts.data_dir)?;
    let signing = nakshatra_swarm::signing_key(&keypair)?;
    let mut cfg = SwarmConfig::server();
    cfg.listen = nakshatra_swarm::with_quic_listeners(&opts.listen);
    cfg.direct_port = opts.direct_port;
    cfg.bootstrap = opts.bootstrap.clone();
    cfg.external_addrs = opts.external_addrs.clone();
    cfg.relays = opts.relays.clone();
    cfg.mdns = opts.mdns;
    cfg.record_ttl = opts.record_ttl;
    cfg.refresh = opts.refresh;
    opts.faults.configure_swarm(&mut cfg);
    let (swarm, task) = nakshatra_swarm::spawn(keypair, cfg).await?;
    match prepare_and_announce(&opts, &swarm, &signing).await {
        Ok(Up {
            engine,
            info,
            chosen,
            addrs,
            sessions,
            servers,
            moving,
        }) => {
            let mover = match (&opts.rebalance, moving) {
                (Some(r), Some((manifest, vocab, budget))) if opts.layers == LayerChoice::Auto => {
                    let now = Instant::now();
                    Some(Mover {
                        rules: range_rules(&manifest, &vocab),
                        opts: opts.clone(),
                        signing,
                        manifest,
                        vocab,
                        budget,
                        rebalancer: placement::Rebalancer::with(
                            now,
                            placement::REBALANCE_CONFIRMATIONS,
                            r.min_dwell,
                        ),
                        period: r.period,
                        next_check: now + r.period,
                    })
                }
                _ => None,
            };
            let (engine_tx, _) = tokio::sync::watch::channel(engine.clone());
            Ok(ServingNode {
                engine,
                swarm,
                task,
                info,
                chosen,
                addrs,
                sessions,
                evict_idle_after: opts.evict_idle_after,
                capacity_at: std::time::Instant::now(),
                servers,
                engine_tx,
                mover,
            })
        }
        Err(e) => {
            let _ = swarm.shutdown().await;
            let _ = task.await;
            Err(e)
        }
    }
}

/// Checks what can be checked without the network: a local model's
/// header and the range against it (the weights are hashed later, once),
/// or the model id's form.
fn check_input(opts: &JoinOptions) -> Result<(), JoinError> {
    if let Some(name) = &opts.engine.device {
        engine::find_device(name)?;
    }
    match &opts.source {
        ModelSource::File(path) => {
            let n_layers = nakshatra_slicer::model_layers(path)
                .map_err(|source| JoinError::Model {
                    path: path.clone(),
                    source,
                })?
                .n_layers;
            if let LayerChoice::Range(r) = &opts.layers {
                check_range(r, n_layers)?;
                // The family's rules (a Gemma 2 split, say): before the
                // node joins anything.
                nakshatra_slicer::check_model_range(path, r.start, r.end).map_err(|source| {
                    JoinError::Refused {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
        }
        ModelSource::Id(id) => {
            nakshatra_swarm::protocol::validate_model_id(id).map_err(|source| {
                JoinError::BadModelId {
                    id: id.clone(),
                    source,
                }
            })?;
        }
        ModelSource::Named(_) | ModelSource::Swarm => {}
    }
    Ok(())
}

fn check_range(r: &Range<u32>, n_layers: u32) -> Result<(), JoinError> {
    if r.start >= r.end || r.end > n_layers {
        return Err(JoinError::Range {
            start: r.start,
            end: r.end,
            n_layers,
        });
    }
    Ok(())
}

/// The slice to serve and what to serve beside it.
struct Prepared {
    /// The GGUF the engine loads.
    slice: PathBuf,
    /// Files pieces are served from (the whole model, or the slice and
    /// its sidecar).
    serve_files: Vec<PathBuf>,
    manifest: Manifest,
    /// The vocabulary-only GGUF.
    vocab: Vec<u8>,
    range: Range<u32>,
    /// The model chosen from the swarm ([`ModelSource::Swarm`]).
    chosen: Option<ModelChoice>,
    /// Bytes of weights `--layers auto` may take.
    budget: u64,
}

async fn prepare(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
) -> Result<Prepared, JoinError> {
    let budget = opts
        .max_memory
        .or_else(|| default_budget(&opts.engine))
        .unwrap_or(u64::MAX);
    match &opts.source {
        ModelSource::File(path) => {
            let p = path.clone();
            let (manifest, vocab) =
                tokio::task::spawn_blocking(move || nakshatra_slicer::manifest_and_vocab(&p))
                    .await?
                    .map_err(|source| JoinError::Model {
                        path: path.clone(),
                        source,
                    })?;
            let range = match &opts.layers {
                LayerChoice::Range(r) => r.clone(),
                LayerChoice::Auto => {
                    // A node with the file may join a swarm that serves
                    // the model already: its providers say so.
                    let me = swarm.peer_id();
                    let served = swarm
                        .model_peers(&manifest.model_id)
                        .await
                        .is_ok_and(|peers| peers.iter().any(|p| *p != me));
                    auto_range(swarm, &manifest, &vocab, budget, served).await?
                }
            };
            let (dir, p, r) = (opts.data_dir.clone(), path.clone(), range.clone());
            let (id, hashes) = (manifest.model_id.clone(), manifest.hashes());
            let slice = tokio::task::spawn_blocking(move || {
                slices::ensure_slice(&dir, &p, &id, &hashes, &r)
            })
            .await??;
            Ok(Prepared {
                slice,
                serve_files: vec![path.clone()],
                manifest,
                vocab,
                range,
                chosen: None,
                budget,
            })
        }
        ModelSource::Id(id) => prepare_fetched(opts, swarm, id, budget).await,
        ModelSource::Named(name) => {
            let choice = resolve_from_swarm(swarm, name).await?;
            tracing::info!("model: {choice}");
            let mut p = prepare_fetched(opts, swarm, &choice.model_id, budget).await?;
            p.chosen = Some(choice);
            Ok(p)
        }
        ModelSource::Swarm => {
            let choice = choose_from_swarm(swarm).await?;
            tracing::info!("model: {choice}");
            let mut p = prepare_fetched(opts, swarm, &choice.model_id, budget).await?;
            p.chosen = Some(choice);
            Ok(p)
        }
    }
}

/// The model the swarm needs most ([`choose::choose_model`]): waits up to
/// [`PEER_WAIT`] for a first peer, then reads the swarm's view every
/// [`CHOOSE_POLL`] until it names a model or [`CHOOSE_WAIT`] passed.
async fn choose_from_swarm(swarm: &nakshatra_swarm::Client) -> Result<ModelChoice, JoinError> {
    swarm.wait_connected(PEER_WAIT).await?;
    let deadline = Instant::now() + CHOOSE_WAIT;
    loop {
        let view = swarm.swarm_view().await?;
        match choose::choose_model(&view.models) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(CHOOSE_POLL).await,
        }
    }
}

/// [`ModelSource::Named`]: waits up to [`PEER_WAIT`] for a first peer,
/// then reads the swarm's view every [`CHOOSE_POLL`] until the name names
/// one model or [`CHOOSE_WAIT`] passed (a name that fits several models
/// is an error at once: waiting will not tell them apart).
async fn resolve_from_swarm(
    swarm: &nakshatra_swarm::Client,
    name: &str,
) -> Result<ModelChoice, JoinError> {
    use nakshatra_swarm::ResolveError;
    swarm.wait_connected(PEER_WAIT).await?;
    let deadline = Instant::now() + CHOOSE_WAIT;
    loop {
        let view = swarm.swarm_view().await?;
        match view.resolve(Some(name)) {
            Ok(model_id) => {
                return Ok(ModelChoice {
                    model_id,
                    reason: choose::ChoiceReason::Named(name.to_string()),
                })
            }
            Err(e @ ResolveError::Ambiguous { .. }) => return Err(e.into()),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(CHOOSE_POLL).await,
        }
    }
}

/// [`ModelSource::Id`]: the manifest and vocabulary from peers serving
/// `id` (verified), the range (`--layers auto` on the verified shape), and
/// the slice fetched piece by piece.
async fn prepare_fetched(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
    id: &str,
    budget: u64,
) -> Result<Prepared, JoinError> {
    let peers = model_sources(swarm, id).await?;
    let (manifest, vocab) = fetch::manifest_and_vocab(swarm, &peers, id, &opts.data_dir).await?;
    let range = match &opts.layers {
        LayerChoice::Range(r) => {
            check_range(r, manifest.n_layers)?;
            // The family's rules, before fetching anything.
            if let Some(rules) = range_rules(&manifest, &vocab) {
                rules
                    .check(r.start, r.end)
                    .map_err(|source| JoinError::RefusedRange {
                        model_id: manifest.model_id.clone(),
                        source,
                    })?;
            }
            r.clone()
        }
        // `peers` served the manifest: the model is served.
        LayerChoice::Auto => auto_range(swarm, &manifest, &vocab, budget, true).await?,
    };
    let slice = fetch_slice(opts, swarm, &peers, &manifest, &vocab, &range).await?;
    let serve_files = slice_files(&slice, &range, manifest.n_layers);
    Ok(Prepared {
        slice,
        serve_files,
        manifest,
        vocab,
        range,
        chosen: None,
        budget,
    })
}

/// The files a fetched slice's pieces are served from: the slice, and the
/// embeddings' sidecar of a first range that is not the whole model.
fn slice_files(slice: &std::path::Path, range: &Range<u32>, n_layers: u32) -> Vec<PathBuf> {
    let mut files = vec![slice.to_path_buf()];
    if range.start == 0 && range.end < n_layers {
        files.push(nakshatra_slicer::embd_sidecar_path(slice));
    }
    files
}

/// Peers that serve `model_id` (not this node), waiting up to
/// [`PEER_WAIT`] for a connection and then for a provider record.
async fn model_sources(
    swarm: &nakshatra_swarm::Client,
    model_id: &str,
) -> Result<Vec<PeerId>, JoinError> {
    let deadline = Instant::now() + PEER_WAIT;
    swarm.wait_connected(PEER_WAIT).await?;
    let me = swarm.peer_id();
    loop {
        let peers: Vec<PeerId> = swarm
            .model_peers(model_id)
            .await?
            .into_iter()
            .filter(|p| *p != me)
            .collect();
        if !peers.is_empty() {
            return Ok(peers);
        }
        if Instant::now() >= deadline {
            return Err(JoinError::UnknownModel(model_id.to_string()));
        }
        tokio::time::sleep(MODEL_POLL).await;
    }
}

/// The family's range rules of a model, from its (verified) vocabulary
/// file, which carries all of the model's metadata. `None` (no rules: any
/// range) only if that file does not parse, which verification rules out.
fn range_rules(manifest: &Manifest, vocab: &[u8]) -> Option<nakshatra_slicer::RangeRules> {
    let g = nakshatra_slicer::Gguf::from_bytes(vocab.to_vec(), "vocabulary")
        .inspect_err(|e| tracing::warn!("vocabulary unreadable for range rules: {e}"))
        .ok()?;
    nakshatra_slicer::RangeRules::new(g.metadata(), manifest.n_layers)
        .inspect_err(|e| tracing::warn!("no range rules for this model: {e}"))
        .ok()
}

/// `--layers auto`'s range, from the swarm's view of the model (read
/// again while it shows no server if `served`:
/// [`placement::view_for_placement`]).
async fn auto_range(
    swarm: &nakshatra_swarm::Client,
    manifest: &Manifest,
    vocab: &[u8],
    budget: u64,
    served: bool,
) -> Result<Range<u32>, JoinError> {
    // The layer count is the verified manifest's: announcements that
    // disagree are left out, however many.
    let shape = fetch::shape_of(manifest);
    let view = placement::view_for_placement(
        swarm,
        &manifest.model_id,
        &shape,
        served,
        placement::VIEW_WAIT,
        placement::VIEW_POLL,
    )
    .await?;
    let rules = range_rules(manifest, vocab);
    let (range, why) = placement::choose_range(manifest, &view, budget, rules.as_ref())?;
    tracing::info!(
        "--layers auto chose {}..{} ({} MB of weights, budget {} MB): {why}",
        range.start,
        range.end,
        manifest.range_bytes(range.start, range.end) / 1_000_000,
        budget / 1_000_000
    );
    Ok(range)
}

/// The slice `range` from the cache (verified) or fetched from peers and
/// assembled.
async fn fetch_slice(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    manifest: &Manifest,
    vocab: &[u8],
    range: &Range<u32>,
) -> Result<PathBuf, JoinError> {
    let id = &manifest.model_id;
    let out = opts.data_dir.slice(id, range);
    if out.exists() {
        let (o, i, h, r) = (out.clone(), id.clone(), manifest.hashes(), range.clone());
        match tokio::task::spawn_blocking(move || slices::verify_cached(&o, &i, &h, &r)).await? {
            Ok(()) => {
                tracing::info!(path = %out.display(), "reusing verified cached slice");
                return Ok(out);
            }
            Err(why) => tracing::warn!(path = %out.display(), %why, "cached slice rejected"),
        }
    }
    let fetch_err = |source| JoinError::Fetch {
        range: range.clone(),
        source,
    };
    let pieces = manifest
        .pieces_for_range(range.start, range.end)
        .map_err(|e| fetch_err(e.into()))?;
    let sources = block_sources(swarm, peers, id, range).await;
    let dir = opts.data_dir.pieces(id);
    let stats = fetch::fetch_pieces(swarm, &sources, manifest, &pieces, &dir)
        .await
        .map_err(fetch_err)?;
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
        std::fs::create_dir_all(parent).map_err(|source| JoinError::SliceDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    let (m, v, d, o, r) = (
        manifest.clone(),
        vocab.to_vec(),
        dir.clone(),
        out.clone(),
        range.clone(),
    );
    tokio::task::spawn_blocking(move || {
        let file = |p: &PieceId| d.bin(p);
        nakshatra_slicer::write_slice_from_pieces(&m, &v, &file, r.start, r.end, &o)
    })
    .await?
    .map_err(JoinError::WriteSlice)?;
    // The slice (and its sidecar) now hold these bytes and are what this
    // node serves from: the pieces would only double the disk used.
    for p in &pieces {
        let _ = std::fs::remove_file(dir.bin(p));
    }
    Ok(out)
}

/// Peers to fetch `range` from: those serving the model, and every holder
/// of one of its blocks.
async fn block_sources(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    model_id: &str,
    range: &Range<u32>,
) -> Vec<PeerId> {
    let mut sources: Vec<PeerId> = peers.to_vec();
    for b in range.clone() {
        if let Ok(h) = swarm.block_holders(model_id, b).await {
            for p in h {
                if !sources.contains(&p) && p != swarm.peer_id() {
                    sources.push(p);
                }
            }
        }
    }
    sources
}

/// What [`prepare_and_announce`] brings up.
struct Up {
    engine: EngineService,
    info: ServerInfo,
    chosen: Option<ModelChoice>,
    addrs: Vec<Multiaddr>,
    sessions: Arc<hop::SessionTable>,
    servers: Vec<nakshatra_swarm::Served>,
    /// Manifest, vocabulary and budget, kept for moves.
    moving: Option<(Manifest, Vec<u8>, u64)>,
}

async fn prepare_and_announce(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
    signing: &ed25519_dalek::SigningKey,
) -> Result<Up, JoinError> {
    let p = prepare(opts, swarm).await?;
    tracing::info!("llama.cpp: {}", engine::system_info());
    let (engine, throughput) = load_and_measure(&p.slice, &opts.engine).await?;
    tracing::info!(
        "layers {}..{} run at {throughput:.1} tokens/s (one-token decode steps)",
        p.range.start,
        p.range.end
    );
    let engine = EngineService::new(engine);
    let offer = VocabOffer::new(
        p.manifest.model_id.clone(),
        p.vocab.clone(),
        &p.manifest.hashes(),
    )?;
    vocab::spawn_server(swarm, offer)?;
    let (sessions, servers) =
        serve_range(opts, swarm, signing, &p.manifest, &p.serve_files, &engine).await?;

    let me = swarm.peer_id();
    let mut addrs: Vec<Multiaddr> = swarm
        .listen_addrs()
        .await?
        .into_iter()
        .map(|a| a.with(Protocol::P2p(me)))
        .collect();
    // TCP first: the first address printed is the one scripts and tests
    // bootstrap from, which every build can dial.
    addrs.sort_by_key(nakshatra_swarm::is_quic);
    let m = &p.manifest;
    let mut si = ServerInfo::new(
        m.model_id.clone(),
        m.arch.clone(),
        m.n_layers,
        p.range.clone(),
        m.n_embd,
    );
    si.devices = device_infos(opts.engine.device.as_deref());
    si.throughput = opts.faults.announced_throughput(throughput);
    si.free_sessions = engine.free_sessions() as u32;
    si.max_sessions = engine.max_sessions() as u32;
    si.context_per_session = engine.ctx_per_session();
    si.model_name = model_name_of(&p.vocab, &m.arch);
    opts.faults.lie_about_shape(&mut si);
    swarm.announce(si.clone()).await?;
    Ok(Up {
        engine,
        info: si,
        chosen: p.chosen,
        addrs,
        sessions,
        servers,
        moving: Some((p.manifest, p.vocab, p.budget)),
    })
}

/// The human name this node announces for its model
/// ([`ServerInfo::model_name`]), from the `general.*` entries of its
/// verified vocabulary file; empty when the file does not parse or the
/// name would not pass the record's checks.
fn model_name_of(vocab: &[u8], arch: &str) -> String {
    match nakshatra_slicer::Gguf::from_bytes(vocab.to_vec(), "the vocabulary") {
        Ok(g) => Some(nakshatra_slicer::model_name(g.metadata(), arch))
            .filter(|n| nakshatra_swarm::protocol::is_valid_model_name(n))
            .unwrap_or_default(),
        Err(e) => {
            tracing::warn!("announcing no model name: {e}");
            String::new()
        }
    }
}

/// Loads the slice and times [`MEASURE_STEPS`] decode steps (the
/// throughput this node announces).
async fn load_and_measure(
    slice: &std::path::Path,
    cfg: &EngineConfig,
) -> Result<(SliceEngine, f64), JoinError> {
    let (slice, cfg) = (slice.to_path_buf(), cfg.clone());
    Ok(tokio::task::spawn_blocking(move || {
        let mut e = SliceEngine::load(&slice, None, &cfg)?;
        let tps = e.measure_decode(MEASURE_STEPS)?;
        Ok::<_, engine::EngineError>((e, tps))
    })
    .await??)
}

/// Starts the servers of one range: manifest and pieces (from
/// `serve_files`), and sessions on `engine`. Called before announcing the
/// range, so that nobody is refused for a protocol not yet served.
async fn serve_range(
    opts: &JoinOptions,
    swarm: &nakshatra_swarm::Client,
    signing: &ed25519_dalek::SigningKey,
    manifest: &Manifest,
    serve_files: &[PathBuf],
    engine: &EngineService,
) -> Result<(Arc<hop::SessionTable>, Vec<nakshatra_swarm::Served>), JoinError> {
    let store = {
        let (m, files, key, faults) = (
            manifest.clone(),
            serve_files.to_vec(),
            signing.clone(),
            opts.faults.clone(),
        );
        tokio::task::spawn_blocking(move || PieceStore::new(m, &key, &files, faults)).await??
    };
    let mut servers = Vec::from(fetch::spawn_piece_servers(swarm, Arc::new(store))?);
    let sessions = Arc::new(hop::SessionTable::default());
    servers.extend(hop::spawn_servers(Arc::new(HopContext {
        engine: engine.clone(),
        swarm: swarm.clone(),
        model_id: manifest.model_id.clone(),
        faults: opts.faults.clone(),
        idle_timeout: opts.idle_timeout,
        asker_quota: nakshatra_swarm::PeerQuota::new(hop::sessions_per_asker(
            engine.max_sessions(),
        )),
        signer: signing.clone(),
        sessions: sessions.clone(),
        evict_idle_after: opts.evict_idle_after,
        resumable: Arc::new(hop::Resumable::default()),
        park_grace: hop::PARK_GRACE,
        trace: opts.trace.clone(),
        rings: Arc::new(hop::Rings::default()),
    }))?);
    Ok((sessions, servers))
}

impl ServingNode {
    /// Re-announces the free session count (sessions idle long enough to
    /// be evicted count as free) when it changed: at once when the node
    /// fills up or gets room again, else at most every
    /// [`CAPACITY_MIN_INTERVAL`] (sessions come and go all the time).
    pub async fn refresh_capacity(&mut self) -> Result<(), JoinError> {
        let free = self.engine.free_sessions() + self.sessions.evictable(self.evict_idle_after);
        let free = free.min(self.engine.max_sessions()) as u32;
        let was = self.info.free_sessions;
        let due = (free == 0) != (was == 0) || self.capacity_at.elapsed() >= CAPACITY_MIN_INTERVAL;
        if free != was && due {
            self.info.free_sessions = free;
            self.capacity_at = std::time::Instant::now();
            self.swarm.announce(self.info.clone()).await?;
        }
        Ok(())
    }

    /// The engine, following moves (see [`ServingNode::rebalance`]).
    pub fn engine_watch(&self) -> tokio::sync::watch::Receiver<EngineService> {
        self.engine_tx.subscribe()
    }

    /// With `--layers auto` and rebalancing on, once per period: reads the
    /// swarm's view of the model and asks the [`placement::Rebalancer`]
    /// whether this node should serve other blocks (Petals' rule, with
    /// hysteresis). On a move: fetches (or reuses) the new slice, loads
    /// and measures it while the old range still serves, then serves and
    /// announces the new range. Sessions already open run on to their end
    /// on the old range's engine, which is freed after the last. Returns
    /// the new range when the node moved.
    pub async fn rebalance(&mut self) -> Result<Option<Range<u32>>, JoinError> {
        let Some(m) = self.mover.as_mut() else {
            return Ok(None);
        };
        let now = Instant::now();
        if now < m.next_check {
            return Ok(None);
        }
        m.next_check = now + m.period;
        let shape = fetch::shape_of(&m.manifest);
        let view = self
            .swarm
            .model_view_with(&m.manifest.model_id, &shape)
            .await?;
        let tput = placement::block_throughput(m.manifest.n_layers, &view.peers, None);
        let current = self.info.start..self.info.end;
        let manifest = &m.manifest;
        let decision = m.rebalancer.check(
            now,
            current.clone(),
            self.info.throughput,
            &tput,
            |a, b| manifest.range_bytes(a, b),
            m.budget,
            m.rules.as_ref(),
        );
        let (to, min_now, min_after) = match decision {
            placement::Rebalance::Move {
                to,
                min_now,
                min_after,
            } => (to, min_now, min_after),
            placement::Rebalance::Stay { positives } => {
                if positives > 0 {
                    tracing::info!(
                        positives,
                        "the swarm would be better balanced with this node elsewhere; confirming"
                    );
                }
                return Ok(None);
            }
        };
        tracing::info!(
            "moving from layers {}..{} to {}..{}: the weakest block would go from {min_now:.1} to {min_after:.1} tokens/s",
            current.start,
            current.end,
            to.start,
            to.end
        );
        match self.move_to(to.clone()).await {
            Ok(()) => Ok(Some(to)),
            Err(e) if self.servers.is_empty() => Err(e),
            Err(e) => {
                // Nothing changed: the old range serves on.
                tracing::warn!("the move to layers {}..{} failed: {e}", to.start, to.end);
                Ok(None)
            }
        }
    }

    /// Serves `to` instead of the current range (see [`Self::rebalance`]).
    /// Fails with the old range still served, unless the new servers
    /// cannot start (`self.servers` is then empty).
    async fn move_to(&mut self, to: Range<u32>) -> Result<(), JoinError> {
        let Some(m) = self.mover.as_ref() else {
            return Ok(());
        };
        let id = m.manifest.model_id.clone();
        // A node with the model file cuts the new slice from it (and goes
        // on serving every piece of the file); others fetch it.
        let (slice, files) = match &m.opts.source {
            ModelSource::File(path) => {
                let (dir, p, r) = (m.opts.data_dir.clone(), path.clone(), to.clone());
                let (id, hashes) = (id.clone(), m.manifest.hashes());
                let slice = tokio::task::spawn_blocking(move || {
                    slices::ensure_slice(&dir, &p, &id, &hashes, &r)
                })
                .await??;
                (slice, vec![path.clone()])
            }
            ModelSource::Id(_) | ModelSource::Named(_) | ModelSource::Swarm => {
                let peers = model_sources(&self.swarm, &id).await?;
                let slice =
                    fetch_slice(&m.opts, &self.swarm, &peers, &m.manifest, &m.vocab, &to).await?;
                let files = slice_files(&slice, &to, m.manifest.n_layers);
                (slice, files)
            }
        };
        let (engine, throughput) = load_and_measure(&slice, &m.opts.engine).await?;
        tracing::info!(
            "layers {}..{} run at {throughput:.1} tokens/s (one-token decode steps)",
            to.start,
            to.end
        );
        let engine = EngineService::new(engine);
        for s in self.servers.drain(..) {
            s.stop().await;
        }
        let (sessions, servers) = serve_range(
            &m.opts,
            &self.swarm,
            &m.signing,
            &m.manifest,
            &files,
            &engine,
        )
        .await?;
        self.servers = servers;
        self.sessions = sessions;
        self.engine = engine.clone();
        self.engine_tx.send_replace(engine);
        self.info.start = to.start;
        self.info.end = to.end;
        self.info.throughput = m.opts.faults.announced_throughput(throughput);
        self.info.free_sessions = self.engine.free_sessions() as u32;
        self.info.max_sessions = self.engine.max_sessions() as u32;
        self.info.context_per_session = self.engine.ctx_per_session();
        self.capacity_at = Instant::now();
        self.swarm.announce(self.info.clone()).await?;
        Ok(())
    }

    /// Withdraws the announcements and stops the swarm.
    pub async fn leave(self) -> Result<(), JoinError> {
        let r = self.swarm.shutdown().await;
        let _ = self.task.await;
        Ok(r?)
    }
}
