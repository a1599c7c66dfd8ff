//! A long-lived asker: one client swarm and identity, shared by any
//! number of concurrent asks (`node ask` starts one for its single ask;
//! the HTTP API keeps one for its whole life).
//!
//! What the asks share: the swarm, the token inbox (the last hops' streams
//! are handed out by session, see [`super::inbox`]), the peer memory
//! (saved under its lock), each model's tokenizer (fetched and verified
//! once), and the meters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nakshatra_swarm::{Multiaddr, PeerId, SwarmConfig};
use tokio::sync::OnceCell;

use super::inbox::TokenInbox;
use super::memory::PeerMemory;
use super::meters::AskMeters;
use super::{AskError, AskEvents, AskOptions, AskOutcome, Asker};
use crate::datadir::DataDir;
use crate::engine::tokenizer::Tokenizer;

/// The swarm an asker joins.
#[derive(Debug, Clone)]
pub struct AskerConfig {
    /// Peers to bootstrap from.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to listen on while asking (each TCP address gets its QUIC
    /// twin, [`nakshatra_swarm::with_quic_listeners`]): with a listening
    /// socket, hole punching can give a direct connection to hops behind
    /// NAT. Empty: no listener (every hop behind NAT stays relayed).
    pub listen: Vec<Multiaddr>,
    /// The direct-stream port (`None`: none, and no direct streams
    /// opened; see [`SwarmConfig::direct_port`]).
    pub direct_port: Option<u16>,
    /// mDNS on the LAN.
    pub mdns: bool,
    /// The vocabulary cache and peer memory live here.
    pub data_dir: DataDir,
    /// How long an ask waits for a first peer.
    pub connect_wait: Duration,
}

/// A client node that asks the swarm, for as many asks at once as its
/// callers make. Cheap to clone.
#[derive(Clone)]
pub struct AskerService {
    inner: Arc<Inner>,
}

/// What the asks of one [`AskerService`] share.
pub(super) struct Inner {
    pub(super) client: nakshatra_swarm::Client,
    pub(super) inbox: TokenInbox,
    pub(super) meters: AskMeters,
    /// Measured speeds and failures, from earlier asks and these.
    pub(super) memory: Mutex<PeerMemory>,
    pub(super) data_dir: DataDir,
    pub(super) connect_wait: Duration,
    /// Each model's tokenizer, loaded from its verified vocabulary once.
    tokenizers: Mutex<HashMap<String, Arc<OnceCell<Arc<Tokenizer>>>>>,
    /// The swarm's event loop.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl AskerService {
    /// Starts the client swarm (a fresh identity) and its token inbox.
    pub async fn start(cfg: AskerConfig) -> Result<AskerService, AskError> {
        let mut sc = SwarmConfig::client();
        sc.bootstrap = cfg.bootstrap.clone();
        sc.listen = nakshatra_swarm::with_quic_listeners(&cfg.listen);
        sc.direct_port = cfg.direct_port;
        sc.mdns = cfg.mdns;
        let key = nakshatra_swarm::IdentityKeypair::generate_ed25519();
        let (client, task) = nakshatra_swarm::spawn(key, sc).await?;
        let inbox = TokenInbox::start(&client)?;
        Ok(AskerService {
            inner: Arc::new(Inner {
                client,
                inbox,
                meters: AskMeters::default(),
                memory: Mutex::new(PeerMemory::load(&cfg.data_dir.peer_memory())),
                data_dir: cfg.data_dir,
                connect_wait: cfg.connect_wait,
                tokenizers: Mutex::new(HashMap::new()),
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The client swarm (for views of the swarm, stats).
    pub fn client(&self) -> &nakshatra_swarm::Client {
        &self.inner.client
    }

    /// What the asks measured so far.
    pub fn meters(&self) -> &AskMeters {
        &self.inner.meters
    }

    /// Runs one ask (see [`super::ask`] for what it does); dropping the
    /// future mid-answer closes its chain at every hop.
    pub async fn ask(&self, opts: &AskOptions, ev: AskEvents<'_>) -> Result<AskOutcome, AskError> {
        self.ask_from(opts, Instant::now(), ev).await
    }

    /// [`AskerService::ask`], with its set-up time counted from `t_setup`.
    pub(super) async fn ask_from(
        &self,
        opts: &AskOptions,
        t_setup: Instant,
        mut ev: AskEvents<'_>,
    ) -> Result<AskOutcome, AskError> {
        Asker {
            svc: &self.inner,
            swarm: &self.inner.client,
            opts,
            t_setup,
            setup_s: std::sync::OnceLock::new(),
        }
        .run(&mut ev)
        .await
    }

    /// Stops the swarm (asks still running fail).
    pub async fn shutdown(&self) {
        let _ = self.inner.client.shutdown().await;
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

impl Inner {
    /// The tokenizer of `model_id`: its vocabulary fetched from `peers`
    /// (in order) and verified the first time, then shared.
    pub(super) async fn tokenizer(
        &self,
        model_id: &str,
        peers: &[PeerId],
    ) -> Result<Arc<Tokenizer>, AskError> {
        let cell = self
            .tokenizers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(model_id.to_string())
            .or_default()
            .clone();
        let t = cell
            .get_or_try_init(|| async {
                let vocab =
                    crate::vocab::fetch(&self.client, peers, model_id, &self.data_dir).await?;
                Ok::<_, AskError>(Arc::new(Tokenizer::load(&vocab)?))
            })
            .await?;
        Ok(t.clone())
    }
}
