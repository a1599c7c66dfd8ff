//! DHT timings on loopback: 20 in-process server nodes plus one client.
//!
//! Prints (does not assert):
//! - time from 5 nodes announcing 6-block ranges of a 30-block model until
//!   the client sees every block covered (`model_view`), and
//! - median / p90 time of one block-holders lookup in the 20-node swarm,
//!   plus the time of a whole `model_view`.
//!
//! Run: `cargo run --release -p nakshatra-swarm --example lookup_bench`
//! (`RUST_LOG=nakshatra_swarm=debug` for the swarm's logs).

use std::time::{Duration, Instant};

use nakshatra_swarm::{spawn, Client, IdentityKeypair, Multiaddr, Role, ServerInfo, SwarmConfig};

const NODES: usize = 20;
const ANNOUNCERS: usize = 5;
const LOOKUPS: usize = 200;
/// Pause after starting the nodes so that identify and the Kademlia
/// bootstrap fill the routing tables before anything is timed.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest wait for the client to see every block covered: generous, it
/// only keeps a broken swarm from hanging the benchmark.
const COVERAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two coverage checks: short, as it bounds the timing's
/// resolution.
const COVERAGE_POLL: Duration = Duration::from_millis(20);

fn config(role: Role, bootstrap: Option<Multiaddr>) -> SwarmConfig {
    let mut c = match role {
        Role::Server => SwarmConfig::server(),
        Role::Client => SwarmConfig::client(),
    };
    if role == Role::Server {
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    }
    c.bootstrap = bootstrap.into_iter().collect();
    c.mdns = false;
    c
}

async fn start(role: Role, bootstrap: Option<Multiaddr>) -> (Client, Option<Multiaddr>) {
    let (client, _task) = spawn(IdentityKeypair::generate_ed25519(), config(role, bootstrap))
        .await
        .expect("spawn");
    let addr = client
        .listen_addrs()
        .await
        .expect("listen addrs")
        .first()
        .map(|a| {
            format!("{a}/p2p/{}", client.peer_id())
                .parse()
                .expect("multiaddr")
        });
    (client, addr)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    // A random tree: node i bootstraps to one earlier node (deterministic
    // LCG), so most nodes are not directly connected to each other.
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) as usize
    };
    let t = Instant::now();
    let mut nodes: Vec<(Client, Option<Multiaddr>)> = Vec::new();
    for i in 0..NODES {
        let bootstrap = if i == 0 {
            None
        } else {
            nodes[next() % i].1.clone()
        };
        nodes.push(start(Role::Server, bootstrap).await);
    }
    println!("started {NODES} nodes in {:?}", t.elapsed());
    // Let routing tables settle a little (identify + kad bootstrap).
    tokio::time::sleep(SETTLE).await;

    let (client, _) = start(Role::Client, nodes[0].1.clone()).await;
    let model = "5a".repeat(32);

    let t = Instant::now();
    for (k, (node, _)) in nodes[NODES - ANNOUNCERS..].iter().enumerate() {
        let k = k as u32;
        let mut info = ServerInfo::new(model.clone(), "llama", 30, k * 6..(k + 1) * 6, 4096);
        info.throughput = 20.0;
        info.max_sessions = 4;
        info.free_sessions = 4;
        node.announce(info).await.expect("announce");
    }
    let coverage = loop {
        let v = client.model_view(&model).await.expect("view");
        if v.is_fully_covered() && v.peers.len() == ANNOUNCERS {
            break t.elapsed();
        }
        if t.elapsed() > COVERAGE_TIMEOUT {
            println!(
                "no full coverage after {COVERAGE_TIMEOUT:?}: gaps {:?}",
                v.gaps
            );
            return;
        }
        tokio::time::sleep(COVERAGE_POLL).await;
    };
    println!(
        "time to full coverage ({ANNOUNCERS} announcing nodes, 30 blocks, client sees all): {coverage:?}"
    );

    // Lookups from the client and from a non-announcing server.
    for (who, asker) in [("client", &client), ("server node 1", &nodes[1].0)] {
        let mut times = Vec::with_capacity(LOOKUPS);
        for _ in 0..LOOKUPS {
            let block = (next() % 30) as u32;
            let t = Instant::now();
            let holders = asker.block_holders(&model, block).await.expect("lookup");
            times.push(t.elapsed());
            assert_eq!(holders.len(), 1, "block {block}");
        }
        times.sort();
        println!(
            "block_holders from the {who} ({LOOKUPS} lookups, {NODES}-node swarm): median {:?}, p90 {:?}, min {:?}, max {:?}",
            percentile(&times, 0.5),
            percentile(&times, 0.9),
            times[0],
            times[times.len() - 1]
        );
    }

    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let v = client.model_view(&model).await.expect("view");
        times.push(t.elapsed());
        assert!(v.is_fully_covered());
    }
    times.sort();
    println!(
        "model_view (30 block lookups + 5 infos + RTTs): median {:?}, max {:?}",
        percentile(&times, 0.5),
        times[times.len() - 1]
    );
    let stats = client.stats().await.expect("stats");
    println!(
        "client: {} connections, {} peers in its routing table",
        stats.connected_peers, stats.routing_table_peers
    );
}
