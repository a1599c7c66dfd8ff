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
}

/// What `node join` needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The whole model.
    pub model: PathBuf,
    /// Layers to serve.
    pub layers: Range<u32>,
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

/// Prepares the range (slice, load, measure), then starts the swarm and
/// announces. Everything that can fail on the user's input fails before
/// any network activity.
pub async fn start(opts: JoinOptions) -> Result<ServingNode, JoinError> {
    let model = opts.model.clone();
    let info = tokio::task::spawn_blocking(move || nakshatra_slicer::inspect(&model))
        .await
        .map_err(|e| JoinError::Task(e.to_string()))?
        .map_err(|source| JoinError::Model {
            path: opts.model.clone(),
            source,
        })?;
    let r = opts.layers.clone();
    if r.start >= r.end || r.end > info.n_layers {
        return Err(JoinError::Range {
            start: r.start,
            end: r.end,
            n_layers: info.n_layers,
        });
    }
    let keypair = load_identity(&opts.data_dir)?;

    let (engine, throughput) = {
        let (dir, model, info, r, cfg) = (
            opts.data_dir.clone(),
            opts.model.clone(),
            info.clone(),
            r.clone(),
            opts.engine.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<_, JoinError> {
            let path = slices::ensure_slice(&dir, &model, &info, &r)?;
            let mut e = SliceEngine::load(&path, None, &cfg)?;
            let tps = e.measure_decode(16)?;
            Ok((e, tps))
        })
        .await
        .map_err(|e| JoinError::Task(e.to_string()))??
    };
    tracing::info!(
        "layers {}..{} run at {throughput:.1} tokens/s (one-token decode steps)",
        r.start,
        r.end
    );
    let engine = EngineService::spawn(engine);

    let mut cfg = SwarmConfig::server();
    cfg.listen = opts.listen.clone();
    cfg.bootstrap = opts.bootstrap.clone();
    cfg.mdns = opts.mdns;
    cfg.record_ttl = opts.record_ttl;
    cfg.refresh = opts.refresh;
    cfg.test_link_delay = opts.test_link_delay;
    let (swarm, task) = nakshatra_swarm::spawn(keypair, cfg).await?;
    let vocab = {
        let (model, info) = (opts.model.clone(), info.clone());
        tokio::task::spawn_blocking(move || crate::ask::vocab_offer(&model, &info))
            .await
            .map_err(|e| JoinError::Task(e.to_string()))?
    };
    let ctx = Arc::new(HopContext {
        engine: engine.clone(),
        control: swarm.stream_control(),
        swarm: swarm.clone(),
        me: swarm.peer_id(),
        model_id: info.id.clone(),
        vocab,
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

    let mut si = ServerInfo::new(
        info.id.clone(),
        info.arch.clone(),
        info.n_layers,
        r.clone(),
        info.n_embd,
    );
    si.devices = device_infos();
    si.throughput = throughput;
    si.free_sessions = engine.free_sessions() as u32;
    si.max_sessions = engine.max_sessions() as u32;
    si.context_per_session = engine.ctx_per_session();
    si.listen_addrs = listen.iter().map(ToString::to_string).collect();
    swarm.announce(si.clone()).await?;
    Ok(ServingNode {
        engine,
        swarm,
        task,
        info: si,
        addrs,
    })
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
