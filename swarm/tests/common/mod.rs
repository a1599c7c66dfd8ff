//! Helpers shared by the swarm tests: in-process nodes on 127.0.0.1 with
//! short timings.

#![allow(dead_code)]

use std::{future::Future, time::Duration};

use nakshatra_swarm::{
    spawn, Client, DeviceInfo, IdentityKeypair, Multiaddr, PeerId, Role, ServerInfo, SwarmConfig,
};
use tokio::{task::JoinHandle, time::Instant};

/// Test TTL and refresh: short, so expiry tests stay fast.
pub const TTL: Duration = Duration::from_secs(6);
pub const REFRESH: Duration = Duration::from_secs(2);

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,libp2p_gossipsub=error,nakshatra_swarm=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A model id for tests (64 lowercase hex).
pub fn model_id(tag: u8) -> String {
    format!("{tag:02x}").repeat(32)
}

pub fn config(role: Role, bootstrap: Vec<Multiaddr>) -> SwarmConfig {
    let mut c = match role {
        Role::Server => SwarmConfig::server(),
        Role::Client => SwarmConfig::client(),
    };
    if role == Role::Server {
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    }
    c.bootstrap = bootstrap;
    c.mdns = false;
    c.mdns_query_interval = Duration::from_secs(1);
    c.record_ttl = TTL;
    c.refresh = REFRESH;
    c.query_timeout = Duration::from_secs(10);
    c.request_timeout = Duration::from_secs(5);
    c.ping_interval = Duration::from_secs(2);
    c.bootstrap_backoff_initial = Duration::from_millis(200);
    c.bootstrap_backoff_max = Duration::from_secs(1);
    c
}

pub struct Node {
    pub client: Client,
    pub task: JoinHandle<()>,
    /// First listen address, with `/p2p/<peer id>`.
    pub addr: Option<Multiaddr>,
}

impl Node {
    pub fn peer(&self) -> PeerId {
        self.client.peer_id()
    }
}

pub async fn start_with(keypair: IdentityKeypair, config: SwarmConfig) -> Node {
    let (client, task) = spawn(keypair, config).await.expect("spawn");
    let addrs = client.listen_addrs().await.expect("listen addrs");
    let addr = addrs
        .first()
        .map(|a| format!("{a}/p2p/{}", client.peer_id()).parse().unwrap());
    Node { client, task, addr }
}

pub async fn start(role: Role, bootstrap: Vec<Multiaddr>) -> Node {
    start_with(IdentityKeypair::generate_ed25519(), config(role, bootstrap)).await
}

/// A plausible info for `start..end` of a 30-layer model.
pub fn fake_info(model: &str, start: u32, end: u32) -> ServerInfo {
    let mut i = ServerInfo::new(model, "llama", 30, start..end, 256);
    i.devices = vec![DeviceInfo {
        name: "CPU".into(),
        backend: "CPU".into(),
        description: "test cpu".into(),
        memory_total: 1 << 30,
        memory_free: 1 << 29,
        features: vec!["AVX2".into(), "FMA".into()],
    }];
    i.throughput = 10.0 + f64::from(start);
    i.max_sessions = 4;
    i.free_sessions = 4;
    i.context_per_session = 2048;
    i
}

/// Polls `f` every 250 ms until it returns `Some`, or panics after
/// `timeout` saying what it waited for.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
