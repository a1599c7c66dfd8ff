//! The swarm simulator: hundreds of real swarm stacks in one process.
//!
//! Every simulated node is this project's own `nakshatra_swarm` stack
//! (`nakshatra_swarm::spawn`: real Kademlia, record signing and checking,
//! info protocol, gossip, view sync, probes, announcements) connected
//! over libp2p's in-process transport (`/memory/N`) with noise and yamux,
//! as on TCP (`SwarmConfig::memory_transport`: a process gets 20,000 file
//! descriptors here, and 200 TCP stacks that meet each other need more;
//! bytes are counted above the transport either way). No engine runs: a node only announces a range of
//! an 80-block model and answers probes. Ranges come from the node crate's
//! real placement (`nakshatra_node::placement`).
//!
//! **Time.** 500 stacks cannot keep a 30 s refresh in real time on 2
//! cores, so every swarm period is multiplied by `time_scale` (refresh,
//! record TTL and with it Kademlia's routing-table refresh, idle timeout,
//! the connection manager's grace, query and request timeouts, pings,
//! gossipsub's heartbeat, the churn rate, the measurement window: one
//! *simulated minute* lasts `60 × time_scale` real seconds). Counts per simulated
//! minute are exact whatever the scale (each announcement or refresh costs
//! the same); latencies (coverage, planning) are real seconds, measured
//! under the load of the whole simulation, so pessimistic.
//!
//! What [`run`] measures, in order:
//! 1. start `nodes` stacks (each bootstraps to a random earlier one),
//!    place them (each with a memory budget of 4 to 32 blocks, placed
//!    one after another as `--layers auto` would with a complete view)
//!    and announce, spread over a few seconds;
//! 2. after one refresh of warm-up, one simulated minute of steady state:
//!    counters of every serving node (DHT walks, requests, bytes sent),
//!    fresh nodes timing their first complete coverage map, an asker
//!    timing `plan`;
//! 3. optionally churn: `churn_per_minute` of the nodes crash each
//!    simulated minute (their task aborted: no withdrawal) and as many
//!    join (placing themselves from their own view of the swarm), while an
//!    observer watches how long crashed nodes stay in its view and how long
//!    a block stays without a live holder in the view although one exists,
//!    an asker plans chains and counts those through a dead node, and the
//!    process's memory and task count are sampled each minute.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nakshatra_node::placement::{block_throughput, Rebalance, Rebalancer};
use nakshatra_swarm::{
    build_model_view_with, spawn, Client, IdentityKeypair, ModelShape, Multiaddr, PeerId,
    PlanOptions, ServerInfo, SwarmConfig, SwarmStats,
};
use tokio::task::JoinHandle;

/// The simulated model: 80 blocks, as a 70B Llama.
pub const BLOCKS: u32 = 80;
/// Its id (any 64 hex: no weights exist).
pub const MODEL: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
/// Longest wait for a fresh node's complete coverage map (real time).
const COVERAGE_TIMEOUT: Duration = Duration::from_secs(90);
/// Pause between two coverage checks of a fresh node.
const COVERAGE_POLL: Duration = Duration::from_millis(50);

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Serving nodes.
    pub nodes: usize,
    /// Every swarm period is multiplied by this (see the module doc).
    pub time_scale: f64,
    /// Fresh nodes timed until they see the full coverage map.
    pub fresh_nodes: usize,
    /// Chains planned (and timed) in the steady-state minute.
    pub plans: usize,
    /// Simulated minutes of churn (0: none).
    pub churn_minutes: u32,
    /// Share of the nodes crashing (and joining) per simulated minute.
    pub churn_per_minute: f64,
    /// After the churn, crash every holder of [`GAP_BLOCK`] with nobody
    /// joining, and time how long rebalancing takes to cover it again.
    pub gap_phase: bool,
    /// Refreshes (simulated) between the announcements and the
    /// steady-state minute: the start's transients (Kademlia's bootstraps
    /// while routing tables fill) end in the warm-up, not in the window.
    pub warmup_refreshes: u32,
    /// Seed of every random choice.
    pub seed: u64,
}

impl SimConfig {
    /// The steady-state measurement for `nodes` nodes.
    /// `NAKSHATRA_SIM_FRESH`, `NAKSHATRA_SIM_PLANS` and
    /// `NAKSHATRA_SIM_WARMUP` override the fresh nodes (3) and plans (20)
    /// timed and the warm-up refreshes (1).
    pub fn steady(nodes: usize, time_scale: f64) -> Self {
        let env = |k: &str, d: usize| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        SimConfig {
            nodes,
            time_scale,
            fresh_nodes: env("NAKSHATRA_SIM_FRESH", 3),
            plans: env("NAKSHATRA_SIM_PLANS", 20),
            churn_minutes: 0,
            churn_per_minute: 0.10,
            gap_phase: false,
            warmup_refreshes: env("NAKSHATRA_SIM_WARMUP", 1) as u32,
            seed: 0x2545_f491_4f6c_dd1d ^ nodes as u64,
        }
    }
}

/// Percentiles of a set of durations, seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pct {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Samples.
    pub n: usize,
}

impl Pct {
    fn of(mut v: Vec<f64>) -> Pct {
        if v.is_empty() {
            return Pct::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Pct {
            p50: at(0.5),
            p99: at(0.99),
            n: v.len(),
        }
    }
}

/// Per serving node, per simulated minute: mean and max over the nodes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rate {
    /// Mean over the serving nodes.
    pub mean: f64,
    /// The busiest node.
    pub max: f64,
}

/// The serving node whose info cache was the least complete.
#[derive(Debug, Clone, Default)]
pub struct LeastCache {
    /// Infos in its cache for the model.
    pub infos: usize,
    /// Its peers connected at the end of the measured minute.
    pub connected: usize,
    /// Its routing-table entries then.
    pub routing_table: usize,
    /// Its gossip mesh peers then.
    pub gossip_mesh: usize,
    /// Gossip infos it received during the measured minute.
    pub gossip_received: u64,
}

/// What [`run`] measured.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// Serving nodes.
    pub nodes: usize,
    /// The time scale it ran at.
    pub time_scale: f64,
    /// Fewest and most holders of a block after the initial placement.
    pub replicas_min_max: (usize, usize),
    /// Throughput of the weakest block (sum of its holders'), and the mean
    /// over blocks, after the initial placement.
    pub weakest_block_tput: (f64, f64),
    /// A fresh node's time to its first complete coverage map (every
    /// block covered, every serving node listed), real seconds.
    pub coverage: Pct,
    /// Fresh nodes that never saw every serving node within the timeout,
    /// and the share of nodes the most incomplete one saw.
    pub coverage_incomplete: (usize, f64),
    /// `Client::plan` from an asker that has planned before, real seconds.
    pub plan: Pct,
    /// Why plans failed: each distinct error with its count.
    pub plan_errors: Vec<(String, usize)>,
    /// DHT walks started per serving node per simulated minute.
    pub walks: Rate,
    /// DHT walks per serving node per simulated minute by kind (means):
    /// bootstrap, closest peers, record reads, record puts, provider
    /// reads, provides (`SwarmStats::dht_queries_by_kind`).
    pub walks_by_kind: [f64; 6],
    /// DHT requests sent per serving node per simulated minute.
    pub requests_out: Rate,
    /// DHT requests received per serving node per simulated minute.
    pub requests_in: Rate,
    /// Bytes sent per serving node per simulated minute.
    pub bytes: Rate,
    /// Peers a serving node is connected to at the end of the measured
    /// minute (mean and most): what its file descriptors and memory pay.
    pub connected: Rate,
    /// Connections a serving node's connection manager closed per
    /// simulated minute (over its high watermark).
    pub trimmed: Rate,
    /// Connections a serving node made again to a peer it had trimmed,
    /// per simulated minute (`SwarmStats::reconnections`).
    pub reconnections: Rate,
    /// The simulation process's CPU time (user and system) per node per
    /// simulated minute, milliseconds: what one stack costs the machine
    /// (every stack, the fresh nodes and the asker share the process).
    pub cpu_ms_per_node: f64,
    /// The process's CPU use over the measured minute, in cores (2 is
    /// this machine saturated).
    pub cpu_cores: f64,
    /// Peers in a serving node's Kademlia routing table at the end of the
    /// measured minute (kad bootstraps itself whenever a new peer enters a
    /// table of fewer than 20).
    pub routing_table: Rate,
    /// Infos a serving node received by gossip per simulated minute
    /// (first copies: gossipsub drops duplicates before they count).
    pub gossip_received: Rate,
    /// Gossip messages a serving node's gossipsub dropped on their way
    /// out per simulated minute (queue full or past its deadline).
    pub gossip_dropped: Rate,
    /// Of those, control messages (GRAFT, PRUNE, IDONTWANT).
    pub gossip_dropped_control: Rate,
    /// A serving node's gossip mesh on the infos topic at the end of the
    /// measured minute (each info goes on to all of it but its sender).
    pub gossip_mesh: Rate,
    /// How long the serving nodes' event loops took to answer a command
    /// at the end of the measured minute, real seconds: how far behind
    /// the machine runs (the time scale is too small when this nears the
    /// scaled request timeouts).
    pub loop_lag: Pct,
    /// Share of the serving nodes in a serving node's own info cache at
    /// the end of the measured minute: the least complete node's, and the
    /// mean (what a fresh node's view sync can get from it).
    pub cache_complete: (f64, f64),
    /// The serving node with the least complete cache at the end of the
    /// measured minute: what it looked like then (to tell an isolated
    /// node from one that lost its infos).
    pub least_cache: Option<LeastCache>,
    /// Churn: nodes crashed.
    pub crashed: usize,
    /// Churn: longest time a crashed node stayed in the observer's view
    /// after its crash, simulated seconds.
    pub max_advertised_after_crash: f64,
    /// Churn: crashed nodes the observer saw after their crash.
    pub seen_after_crash: usize,
    /// Churn: longest time a block had no live holder in the observer's
    /// view while a live node held it, simulated seconds.
    pub max_hidden_block: f64,
    /// Churn: longest time a block had no live holder at all, simulated
    /// seconds.
    pub max_uncovered_block: f64,
    /// Churn: chains planned, and those through a node crashed before the
    /// plan returned.
    pub chains: (usize, usize),
    /// Churn: of the chains through a dead node, those through one that
    /// had crashed before the plan began (its view was stale: the info
    /// not expired yet, and the probe did not catch it); the rest met
    /// only nodes that crashed while the plan was being made.
    pub chains_dead_before: usize,
    /// Churn: how long each plan took, real seconds.
    pub churn_plan: Pct,
    /// Churn: why the asker's plans failed, each distinct error with its
    /// count (at most [`MAX_DISTINCT_ERRORS`], then "other").
    pub churn_plan_errors: Vec<(String, usize)>,
    /// Churn: fewest peers the asker was connected to after a plan
    /// (`None`: no plan returned).
    pub churn_asker_least_connected: Option<usize>,
    /// Churn: the asker's RTT probes over all its plans (made, of which
    /// silent), from [`nakshatra_swarm::Client::probe_stats`].
    pub churn_probes: (u64, u64),
    /// Churn: (simulated minute, live nodes, process RSS MiB, alive tokio
    /// tasks) each minute.
    pub samples: Vec<(u32, usize, f64, usize)>,
    /// The record TTL in simulated seconds.
    pub ttl_s: f64,
    /// Serving nodes whose event loop ended on its own (a panic inside
    /// libp2p, say) before the simulation stopped or crashed it.
    pub loops_died: usize,
    /// Churn: joins placed and announced, and joins given up (not placed
    /// within [`JOIN_DEADLINE`], or their announcement failed).
    pub joins: (usize, usize),
    /// Churn: rebalancing moves in all, and the most by one node.
    pub moves: usize,
    /// Churn: the most moves one node made.
    pub max_moves_per_node: u32,
    /// Churn: rebalancing checks run, timed out (the node's event loop did
    /// not hand over its cache in time) and skipped (the node's previous
    /// check still running), all nodes together.
    pub rebalance_checks: (usize, usize, usize),
    /// Churn: rebalancing checks run per node (of the configured count)
    /// per simulated minute (the simulator aims at `CHECKS_PER_MINUTE`).
    pub checks_per_node_minute: f64,
    /// Churn: fewest and most holders of a block at the end.
    pub end_replicas_min_max: (usize, usize),
    /// Churn: weakest block's throughput and the mean at the end.
    pub end_weakest_block_tput: (f64, f64),
    /// Gap phase: holders of [`GAP_BLOCK`] crashed at once, and the
    /// simulated seconds until a live node covered it again by moving
    /// (`None`: not within the wait).
    pub gap: Option<(usize, Option<f64>)>,
}

/// A deterministic random source (the simulation is scripted, not
/// random; only the order of events on the runtime varies).
#[derive(Debug, Clone)]
pub struct Lcg(u64);

impl Lcg {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Lcg(seed | 1)
    }
    /// Next 31 random bits.
    pub fn next_bits(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as usize
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.next_bits() % n.max(1)
    }
}

/// Most distinct plan errors a report keeps (an error names its blocks,
/// so a churning swarm could make many).
const MAX_DISTINCT_ERRORS: usize = 8;

/// Counts `e` among `errors`, keeping at most [`MAX_DISTINCT_ERRORS`].
fn count_error(errors: &mut Vec<(String, usize)>, e: String) {
    let e = if errors.len() >= MAX_DISTINCT_ERRORS && !errors.iter().any(|(m, _)| *m == e) {
        "other".to_string()
    } else {
        e
    };
    match errors.iter_mut().find(|(m, _)| *m == e) {
        Some((_, n)) => *n += 1,
        None => errors.push((e, 1)),
    }
}

/// The churn's asker as it goes, for the progress lines (a 500-node run
/// takes two hours; its closing figures come only at the end).
#[derive(Default)]
struct AskerLive {
    ok: usize,
    failed: usize,
    last_error: Option<String>,
    /// Peers connected after the last plan.
    connected: usize,
    /// Serving peers in the asker's info cache after the last plan, and
    /// how many of them hold the first and the last block.
    cached: (usize, usize, usize),
}

/// What the churn's asker saw besides its chains.
struct AskerReport {
    errors: Vec<(String, usize)>,
    least_connected: Option<usize>,
}

/// One simulated serving node.
struct Node {
    client: Client,
    task: JoinHandle<()>,
    addr: Multiaddr,
    budget: u32,
    tput: f64,
    range: Range<u32>,
    rebalancer: Rebalancer,
    moves: u32,
}

/// Rebalancing checks per node per simulated minute (Petals checks every
/// U(0, 240 s); the simulator checks more often so that ten minutes show
/// moves).
const CHECKS_PER_MINUTE: f64 = 4.0;
/// The block whose every holder the gap phase crashes.
pub const GAP_BLOCK: u32 = 40;
/// Longest the gap phase waits for a move to cover [`GAP_BLOCK`] again,
/// simulated minutes.
const GAP_WAIT_MINUTES: f64 = 6.0;
/// The least time between two moves of one node in the simulation, in
/// simulated minutes (the product's [`nakshatra_node::placement::MIN_DWELL`]
/// is 30 minutes, longer than a whole simulated run).
const SIM_DWELL_MINUTES: f64 = 2.0;

/// Longest a rebalancing check waits for its node's event loop to hand
/// over the info cache, simulated seconds (then it is counted as timed out
/// and the node checks again later).
const REBALANCE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a joining node may take from its start to its announcement,
/// simulated seconds. Past it the join is given up (its stack stopped) and
/// counted: a join that never ends would keep a stack running outside the
/// node list, neither crashed by the churn nor counted live, and on a
/// saturated machine such stacks could pile up.
const JOIN_DEADLINE: Duration = Duration::from_secs(120);

/// Longest the churn's minute line waits for a node's stats, simulated
/// seconds (a node that does not answer is left out of it).
const MINUTE_STATS_TIMEOUT: Duration = Duration::from_secs(30);

/// The churn's joins, counted as they go.
#[derive(Debug, Default)]
struct JoinCounts {
    /// Started, not placed or given up yet.
    in_flight: AtomicUsize,
    /// Placed and announced.
    done: AtomicUsize,
    /// Given up at [`JOIN_DEADLINE`] or failed to announce.
    failed: AtomicUsize,
}

/// What the simulator's rebalancing checks did, counted across nodes.
#[derive(Debug, Default)]
struct RebalanceCounts {
    /// Checks that ran the node's rebalancer.
    done: AtomicUsize,
    /// Checks whose node did not hand over its cache in time.
    timed_out: AtomicUsize,
    /// Picks skipped because the node's previous check was still running.
    skipped: AtomicUsize,
    /// Moves made.
    moves: AtomicUsize,
    /// Checks under way now.
    running: AtomicUsize,
}

/// One rebalancing check of the node behind `client`: its own cached view,
/// its rebalancer, and the move (a new announcement) if it says so.
async fn check_once(
    client: Client,
    answer_within: Duration,
    nodes: &Mutex<Vec<Node>>,
    state: &Mutex<ChurnState>,
    counts: &RebalanceCounts,
) {
    let infos = match tokio::time::timeout(answer_within, client.cached_infos(Some(MODEL))).await {
        Ok(Ok(infos)) => infos,
        Ok(Err(_)) => return,
        Err(_) => {
            counts.timed_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let view =
        nakshatra_swarm::build_model_view_with(MODEL, Some(&shape()), &infos, &HashMap::new());
    let tput = block_throughput(BLOCKS, &view.peers, None);
    let peer = client.peer_id();
    let decision = {
        let mut ns = nodes.lock().expect("node list");
        // Crashed since it was picked: nothing to do.
        let Some(node) = ns.iter_mut().find(|n| n.client.peer_id() == peer) else {
            return;
        };
        counts.done.fetch_add(1, Ordering::Relaxed);
        let d = node.rebalancer.check(
            Instant::now(),
            node.range.clone(),
            node.tput,
            &tput,
            |a, b| u64::from(b.saturating_sub(a)),
            u64::from(node.budget),
            None,
        );
        match d {
            Rebalance::Move { to, .. } => Some((to, node.tput)),
            _ => None,
        }
    };
    let Some((to, t)) = decision else { return };
    if client.announce(info_for(&to, t)).await.is_err() {
        return;
    }
    let mut ns = nodes.lock().expect("node list");
    if let Some(node) = ns.iter_mut().find(|n| n.client.peer_id() == peer) {
        node.range = to.clone();
        node.moves += 1;
        counts.moves.fetch_add(1, Ordering::Relaxed);
        state.lock().expect("churn state").live.insert(peer, to);
    }
}

fn rebalancer(scale: f64) -> Rebalancer {
    Rebalancer::with(
        Instant::now(),
        nakshatra_node::placement::REBALANCE_CONFIRMATIONS,
        scaled(Duration::from_secs_f64(60.0 * SIM_DWELL_MINUTES), scale),
    )
}

impl Node {
    fn new(
        client: Client,
        task: JoinHandle<()>,
        addr: Multiaddr,
        budget: u32,
        tput: f64,
        range: Range<u32>,
        scale: f64,
    ) -> Self {
        Node {
            client,
            task,
            addr,
            budget,
            tput,
            range,
            rebalancer: rebalancer(scale),
            moves: 0,
        }
    }
}

/// Fewest and most holders of a block, and the weakest block's and the
/// mean block's throughput, of nodes holding `(range, throughput)`.
fn balance<'a>(nodes: impl Iterator<Item = (&'a Range<u32>, f64)>) -> ((usize, usize), (f64, f64)) {
    let mut replicas = vec![0usize; BLOCKS as usize];
    let mut tput = vec![0f64; BLOCKS as usize];
    for (range, t) in nodes {
        for b in range.clone() {
            replicas[b as usize] += 1;
            tput[b as usize] += t;
        }
    }
    (
        (
            replicas.iter().copied().min().unwrap_or(0),
            replicas.iter().copied().max().unwrap_or(0),
        ),
        (
            tput.iter().copied().fold(f64::INFINITY, f64::min),
            tput.iter().sum::<f64>() / f64::from(BLOCKS),
        ),
    )
}

fn scaled(d: Duration, scale: f64) -> Duration {
    d.mul_f64(scale)
}

/// The swarm configuration of a simulated node (`server` or client).
pub fn sim_config(server: bool, bootstrap: Option<Multiaddr>, scale: f64) -> SwarmConfig {
    let mut c = if server {
        SwarmConfig::server()
    } else {
        SwarmConfig::client()
    };
    if server {
        c.listen = vec!["/memory/0".parse().expect("multiaddr")];
    }
    c.memory_transport = true;
    c.bootstrap = bootstrap.into_iter().collect();
    c.mdns = false;
    c.refresh = scaled(c.refresh, scale);
    c.record_ttl = scaled(c.record_ttl, scale);
    // `NAKSHATRA_SIM_IDLE` (seconds) overrides the idle timeout: with the
    // default 60 s every node of 200 stays connected to nearly every
    // other (DHT walks meet them all within a minute), which 500 nodes in
    // one process cannot afford in memory.
    let idle = std::env::var("NAKSHATRA_SIM_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(c.idle_connection_timeout, Duration::from_secs);
    c.idle_connection_timeout = scaled(idle, scale);
    c.connections.grace = scaled(c.connections.grace, scale);
    // `NAKSHATRA_SIM_WATERMARKS=LOW,HIGH` overrides the connection
    // manager's watermarks (to compare them: docs/scale.md).
    if let Some((low, high)) = std::env::var("NAKSHATRA_SIM_WATERMARKS")
        .ok()
        .and_then(|v| v.split_once(',').map(|(l, h)| (l.parse(), h.parse())))
        .and_then(|(l, h)| Some((l.ok()?, h.ok()?)))
    {
        c.connections.low = low;
        c.connections.high = high;
    }
    c.query_timeout = scaled(c.query_timeout, scale);
    c.ping_interval = scaled(c.ping_interval, scale);
    // A dial and a probe wait on the machine (every stack's event loop
    // shares two cores), not on the simulated network, which has no
    // latency: their timeouts follow a slower clock but are never
    // shortened below the product's. The dial timeout unscaled, 10 s real
    // against event loops answering in 6-13 s at 500 nodes, failed most
    // of the churn asker's dials (two peers connected after six minutes)
    // and every plan with them; the probe timeout at 0.75 s real (time
    // scale 0.25) left live edge holders "unreachable".
    c.probe_timeout = scaled(c.probe_timeout, scale.max(1.0));
    c.dial_timeout = scaled(c.dial_timeout, scale.max(1.0));
    // A policy period, not a wait on the machine: it follows the clock
    // (unscaled, 60 s real at scale 6 was 10 simulated s, shorter than
    // one of the 500-node asker's plans, and the asker chose crashed
    // peers it had found silent a plan before).
    c.silent_peer_memory = scaled(c.silent_peer_memory, scale);
    c.gossip_heartbeat = scaled(c.gossip_heartbeat, scale);
    c.request_timeout = scaled(c.request_timeout, scale);
    c
}

async fn start_stack(
    server: bool,
    bootstrap: Option<Multiaddr>,
    scale: f64,
) -> (Client, JoinHandle<()>, Multiaddr) {
    let (client, task) = spawn(
        IdentityKeypair::generate_ed25519(),
        sim_config(server, bootstrap, scale),
    )
    .await
    .expect("spawn a swarm stack");
    let addr = match client.listen_addrs().await.expect("listen addrs").first() {
        Some(a) => format!("{a}/p2p/{}", client.peer_id())
            .parse()
            .expect("multiaddr"),
        None => Multiaddr::empty(),
    };
    (client, task, addr)
}

/// A node's memory budget in blocks, and its speed: a mix from small
/// machines (4 blocks) to big ones (32), some faster than others.
fn hardware(rng: &mut Lcg) -> (u32, f64) {
    const BUDGETS: [u32; 8] = [4, 6, 8, 10, 12, 16, 24, 32];
    const SPEEDS: [f64; 3] = [0.5, 1.0, 2.0];
    let blocks = BUDGETS[rng.below(BUDGETS.len())];
    let speed = SPEEDS[rng.below(SPEEDS.len())];
    // Tokens per second through the whole range: a node runs a fixed
    // number of block-steps per second.
    (blocks, speed * 400.0 / blocks as f64)
}

fn info_for(range: &Range<u32>, tput: f64) -> ServerInfo {
    let mut info = ServerInfo::new(MODEL, "llama", BLOCKS, range.clone(), 8192);
    info.throughput = tput;
    info.max_sessions = 8;
    info.free_sessions = 8;
    info.context_per_session = 4096;
    info
}

fn shape() -> ModelShape {
    ModelShape {
        n_layers: BLOCKS,
        arch: "llama".into(),
    }
}

fn place(tput: &[f64], budget: u32) -> Range<u32> {
    match nakshatra_node::placement::choose_range_by(
        BLOCKS,
        |a, b| u64::from(b.saturating_sub(a)),
        tput,
        u64::from(budget),
        None,
    ) {
        Ok((r, _)) => r,
        Err(e) => panic!("placement with a budget of {budget} blocks failed: {e}"),
    }
}

/// A line on stderr saying how far a run has got (real seconds since
/// `t0`): a 500-node run takes over half an hour.
fn progress(t0: Instant, what: &str) {
    eprintln!("sim: {:>7.1} s  {what}", t0.elapsed().as_secs_f64());
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|pages| pages * 4096.0 / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

async fn all_stats(nodes: &[Node]) -> Vec<Option<SwarmStats>> {
    all_stats_timed(nodes.iter().map(|n| &n.client), None)
        .await
        .0
}

/// Every node's stats, and how long each event loop took to answer (a
/// command waits behind everything the loop has queued: on an overloaded
/// machine this grows, and the time scale is too small). With `within`, a
/// node that has not answered by then counts as `None`.
async fn all_stats_timed<'a>(
    clients: impl IntoIterator<Item = &'a Client>,
    within: Option<Duration>,
) -> (Vec<Option<SwarmStats>>, Vec<f64>) {
    futures::future::join_all(clients.into_iter().map(|c| async move {
        let t = Instant::now();
        let s = match within {
            Some(w) => tokio::time::timeout(w, c.stats()).await.ok(),
            None => Some(c.stats().await),
        };
        (s.and_then(Result::ok), t.elapsed().as_secs_f64())
    }))
    .await
    .into_iter()
    .unzip()
}

/// Runs one simulation (on the current multi-threaded tokio runtime).
pub async fn run(cfg: &SimConfig) -> SimReport {
    let s = cfg.time_scale;
    let mut rng = Lcg::new(cfg.seed);
    let mut report = SimReport {
        nodes: cfg.nodes,
        time_scale: s,
        ttl_s: SwarmConfig::server().record_ttl.as_secs_f64(),
        ..SimReport::default()
    };

    let t0 = Instant::now();
    // 1. Start and place.
    let mut nodes: Vec<Node> = Vec::with_capacity(cfg.nodes);
    let mut tput = vec![0f64; BLOCKS as usize];
    for i in 0..cfg.nodes {
        let bootstrap = (i > 0).then(|| nodes[rng.below(i)].addr.clone());
        let (client, task, addr) = start_stack(true, bootstrap, s).await;
        let (budget, t) = hardware(&mut rng);
        let range = place(&tput, budget);
        for b in range.clone() {
            tput[b as usize] += t;
        }
        nodes.push(Node::new(client, task, addr, budget, t, range, s));
    }
    (report.replicas_min_max, report.weakest_block_tput) =
        balance(nodes.iter().map(|n| (&n.range, n.tput)));
    progress(t0, "started and placed the nodes");
    // Routing tables fill (identify, Kademlia bootstrap) before anyone
    // announces.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spread = scaled(Duration::from_secs(10), s.min(1.0));
    let n_nodes = nodes.len();
    futures::future::join_all(nodes.iter().enumerate().map(|(i, n)| {
        let info = info_for(&n.range, n.tput);
        let delay = spread.mul_f64(i as f64 / n_nodes as f64);
        async move {
            tokio::time::sleep(delay).await;
            n.client.announce(info).await.expect("announce");
        }
    }))
    .await;
    progress(t0, "announced");
    tokio::time::sleep(scaled(SwarmConfig::server().refresh, s) * cfg.warmup_refreshes).await;

    // 2. One simulated minute of steady state.
    let minute = scaled(Duration::from_secs(60), s);
    let before = all_stats(&nodes).await;
    let cpu_before = process_cpu();
    let t_window = Instant::now();
    let boot: Vec<Multiaddr> = nodes.iter().map(|n| n.addr.clone()).collect();
    let live = cfg.nodes;
    let fresh = {
        let boot = boot.clone();
        let mut rng = rng.clone();
        let k = cfg.fresh_nodes;
        tokio::spawn(async move {
            let mut times = Vec::new();
            let mut incomplete = (0usize, 1.0f64);
            for _ in 0..k {
                let (c, task, _) =
                    start_stack(false, Some(boot[rng.below(boot.len())].clone()), s).await;
                let t = Instant::now();
                let _ = c.wait_connected(Duration::from_secs(10)).await;
                let mut best = 0usize;
                loop {
                    // The map only (what a view syncs and checks), not the
                    // RTT column `swarm status` adds.
                    let _ = c.sync_view(Some(MODEL), Duration::ZERO).await;
                    if let Ok(infos) = c.cached_infos(Some(MODEL)).await {
                        let v =
                            build_model_view_with(MODEL, Some(&shape()), &infos, &HashMap::new());
                        best = best.max(v.peers.len());
                        if v.is_fully_covered() && v.peers.len() >= live {
                            times.push(t.elapsed().as_secs_f64());
                            break;
                        }
                    }
                    if t.elapsed() > COVERAGE_TIMEOUT {
                        incomplete.0 += 1;
                        incomplete.1 = incomplete.1.min(best as f64 / live as f64);
                        break;
                    }
                    tokio::time::sleep(COVERAGE_POLL).await;
                }
                let _ = c.shutdown().await;
                task.abort();
            }
            (times, incomplete)
        })
    };
    let asker = {
        let b = boot[rng.below(boot.len())].clone();
        let plans = cfg.plans;
        tokio::spawn(async move {
            let (c, task, _) = start_stack(false, Some(b), s).await;
            let _ = c.wait_connected(Duration::from_secs(10)).await;
            let opts = PlanOptions {
                shape: Some(shape()),
                ..PlanOptions::default()
            };
            // A first plan warms the asker (connections, peer memory).
            let _ = c.plan(MODEL, &opts).await;
            let mut times = Vec::new();
            let mut errors: Vec<(String, usize)> = Vec::new();
            for _ in 0..plans {
                let t = Instant::now();
                match c.plan(MODEL, &opts).await {
                    Ok(_) => times.push(t.elapsed().as_secs_f64()),
                    Err(e) => count_error(&mut errors, e.to_string()),
                }
            }
            let _ = c.shutdown().await;
            task.abort();
            (times, errors)
        })
    };
    let (fresh_times, incomplete) = fresh.await.expect("fresh nodes task");
    progress(t0, "fresh nodes done");
    let (plan_times, plan_errors) = asker.await.expect("asker task");
    progress(t0, "plans done");
    if let Some(left) = minute.checked_sub(t_window.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let (after, lags) = all_stats_timed(nodes.iter().map(|n| &n.client), None).await;
    report.loop_lag = Pct::of(lags);
    let minutes = t_window.elapsed().as_secs_f64() / minute.as_secs_f64();
    report.coverage = Pct::of(fresh_times);
    report.coverage_incomplete = incomplete;
    report.plan = Pct::of(plan_times);
    report.plan_errors = plan_errors;
    let rate = |f: fn(&SwarmStats) -> u64| -> Rate {
        let v: Vec<f64> = before
            .iter()
            .zip(&after)
            .filter_map(|(b, a)| Some((f(a.as_ref()?) - f(b.as_ref()?)) as f64 / minutes))
            .collect();
        Rate {
            mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
            max: v.iter().copied().fold(0.0, f64::max),
        }
    };
    report.walks = rate(|s| s.dht_queries);
    for (k, w) in report.walks_by_kind.iter_mut().enumerate() {
        let v: Vec<f64> = before
            .iter()
            .zip(&after)
            .filter_map(|(b, a)| {
                let (a, b) = (a.as_ref()?, b.as_ref()?);
                Some((a.dht_queries_by_kind[k] - b.dht_queries_by_kind[k]) as f64 / minutes)
            })
            .collect();
        *w = v.iter().sum::<f64>() / v.len().max(1) as f64;
    }
    report.requests_out = rate(|s| s.dht_requests_out);
    report.requests_in = rate(|s| s.dht_requests_in);
    report.bytes = rate(|s| s.bytes_sent);
    report.trimmed = rate(|s| s.connections_trimmed);
    report.reconnections = rate(|s| s.reconnections);
    if let (Some(a), Some(b)) = (process_cpu(), cpu_before) {
        let cpu = a.saturating_sub(b).as_secs_f64();
        report.cpu_ms_per_node = cpu * 1000.0 / minutes / live.max(1) as f64;
        report.cpu_cores = cpu / t_window.elapsed().as_secs_f64();
    }
    report.gossip_received = rate(|s| s.gossip_received);
    report.gossip_dropped = rate(|s| s.gossip_dropped);
    report.gossip_dropped_control = rate(|s| s.gossip_dropped_control);
    // A gauge at the end of the measured minute: mean and most.
    let gauge = |f: fn(&SwarmStats) -> usize| {
        let v: Vec<f64> = after.iter().flatten().map(|s| f(s) as f64).collect();
        Rate {
            mean: v.iter().sum::<f64>() / v.len().max(1) as f64,
            max: v.iter().copied().fold(0.0, f64::max),
        }
    };
    report.gossip_mesh = gauge(|s| s.gossip_mesh);
    report.connected = gauge(|s| s.connected_peers);
    report.routing_table = gauge(|s| s.routing_table_peers);

    let sizes = futures::future::join_all(nodes.iter().map(|n| async {
        n.client
            .cached_infos(Some(MODEL))
            .await
            .map_or(0, |v| v.len())
    }))
    .await;
    let share: Vec<f64> = sizes
        .iter()
        .map(|&k| k.min(live) as f64 / live.max(1) as f64)
        .collect();
    report.cache_complete = (
        share.iter().copied().fold(1.0, f64::min),
        share.iter().sum::<f64>() / share.len().max(1) as f64,
    );
    report.least_cache =
        sizes
            .iter()
            .enumerate()
            .min_by_key(|(_, &k)| k)
            .and_then(|(i, &infos)| {
                let (a, b) = (after.get(i)?.as_ref()?, before.get(i)?.as_ref()?);
                Some(LeastCache {
                    infos,
                    connected: a.connected_peers,
                    routing_table: a.routing_table_peers,
                    gossip_mesh: a.gossip_mesh,
                    gossip_received: a.gossip_received - b.gossip_received,
                })
            });
    progress(t0, "measured the steady-state minute");
    eprintln!("{}\n  ({})", table_row(&report), steady_details(&report));
    report.loops_died = nodes.iter().filter(|n| n.task.is_finished()).count();

    // 3. Churn.
    if cfg.churn_minutes > 0 {
        churn(cfg, &mut rng, nodes, &mut report).await;
    } else {
        for n in nodes {
            n.task.abort();
        }
    }
    report
}

/// Shared between the churn driver and its observer.
#[derive(Default)]
struct ChurnState {
    /// Crash time of every crashed node.
    crashed: HashMap<PeerId, Instant>,
    /// Ranges of the live, announced nodes (the ground truth).
    live: HashMap<PeerId, Range<u32>>,
}

async fn churn(cfg: &SimConfig, rng: &mut Lcg, nodes: Vec<Node>, report: &mut SimReport) {
    let s = cfg.time_scale;
    let minute = scaled(Duration::from_secs(60), s);
    let state = Arc::new(Mutex::new(ChurnState::default()));
    {
        let mut st = state.lock().expect("churn state");
        for n in &nodes {
            st.live.insert(n.client.peer_id(), n.range.clone());
        }
    }
    // A plain mutex, never held across an await: tokio's fair one hands
    // the lock from waiter to waiter, each handover waiting for the next
    // waiter's turn on the runtime, and at 500 nodes on 2 cores (a turn
    // takes seconds) the churn driver queued behind every rebalancing
    // check of the minute.
    let nodes = Arc::new(Mutex::new(nodes));
    // Set once at the end; every task sees it whenever it looks (a
    // `Notify` only wakes tasks waiting at that instant, and a rebalancing
    // round of a 500-node run on 2 cores can outlast any wait for it).
    let (stop_tx, stop) = tokio::sync::watch::channel(false);

    // The observer: its view every few (simulated) seconds.
    let observer = {
        let state = state.clone();
        let mut stop = stop.clone();
        let b = nodes.lock().expect("node list")[0].addr.clone();
        let period = scaled(Duration::from_secs(3), s);
        tokio::spawn(async move {
            let (c, task, _) = start_stack(false, Some(b), s).await;
            let _ = c.wait_connected(Duration::from_secs(10)).await;
            let mut max_seen = 0f64;
            let mut seen: HashSet<PeerId> = HashSet::new();
            let mut hidden_since: HashMap<u32, Instant> = HashMap::new();
            let mut bare_since: HashMap<u32, Instant> = HashMap::new();
            let mut max_hidden = 0f64;
            let mut max_bare = 0f64;
            let sh = shape();
            loop {
                // The view reflects the cache as synced at the start of
                // the call (the RTT pings after it take seconds for dead
                // peers): stamp it then.
                let now = Instant::now();
                let view = tokio::select! {
                    v = c.model_view_with(MODEL, &sh) => v,
                    _ = stop.wait_for(|s| *s) => break,
                };
                let Ok(view) = view else { continue };
                {
                    let st = state.lock().expect("churn state");
                    for p in &view.peers {
                        if let Some(at) = st.crashed.get(&p.peer_id) {
                            seen.insert(p.peer_id);
                            max_seen = max_seen.max(now.duration_since(*at).as_secs_f64());
                        }
                    }
                    for b in 0..BLOCKS {
                        let live_holder = st.live.values().any(|r| r.contains(&b));
                        let shown = view
                            .coverage
                            .get(b as usize)
                            .is_some_and(|h| h.iter().any(|p| st.live.contains_key(p)));
                        let track = |on: bool, since: &mut HashMap<u32, Instant>, max: &mut f64| {
                            if on {
                                let t0 = *since.entry(b).or_insert(now);
                                *max = max.max(now.duration_since(t0).as_secs_f64());
                            } else {
                                since.remove(&b);
                            }
                        };
                        track(live_holder && !shown, &mut hidden_since, &mut max_hidden);
                        track(!live_holder, &mut bare_since, &mut max_bare);
                    }
                }
                tokio::time::sleep(period).await;
            }
            let _ = c.shutdown().await;
            task.abort();
            (max_seen, seen.len(), max_hidden, max_bare)
        })
    };

    // The asker: plans and checks them against the crashes.
    let asker_live: Arc<Mutex<AskerLive>> = Arc::default();
    let asker = {
        let state = state.clone();
        let live = asker_live.clone();
        let mut stop = stop.clone();
        let b = nodes.lock().expect("node list")[1].addr.clone();
        let period = scaled(Duration::from_secs(2), s);
        tokio::spawn(async move {
            let (c, task, _) = start_stack(false, Some(b), s).await;
            let _ = c.wait_connected(Duration::from_secs(10)).await;
            let opts = PlanOptions {
                shape: Some(shape()),
                ..PlanOptions::default()
            };
            let (mut total, mut dead, mut dead_before) = (0usize, 0usize, 0usize);
            let mut took = Vec::new();
            let mut errors: Vec<(String, usize)> = Vec::new();
            let mut least_connected: Option<usize> = None;
            let probes0 = c.probe_stats();
            loop {
                let began = Instant::now();
                let chain = tokio::select! {
                    c = c.plan(MODEL, &opts) => c,
                    _ = stop.wait_for(|s| *s) => break,
                };
                took.push(began.elapsed().as_secs_f64());
                let mut connected = 0;
                if let Ok(peers) = c.connected_peers().await {
                    connected = peers.len();
                    least_connected =
                        Some(least_connected.map_or(peers.len(), |l| l.min(peers.len())));
                }
                {
                    let cached = c.cached_infos(Some(MODEL)).await.unwrap_or_default();
                    let first = cached.iter().filter(|(_, i)| i.start == 0).count();
                    let last = cached.iter().filter(|(_, i)| i.end == BLOCKS).count();
                    let mut l = live.lock().expect("asker progress");
                    match &chain {
                        Ok(_) => l.ok += 1,
                        Err(e) => {
                            let e = e.to_string();
                            count_error(&mut errors, e.clone());
                            l.failed += 1;
                            l.last_error = Some(e);
                        }
                    }
                    l.connected = connected;
                    l.cached = (cached.len(), first, last);
                }
                if let Ok(chain) = chain {
                    total += 1;
                    // When each dead hop crashed.
                    let crashes: Vec<Instant> = {
                        let st = state.lock().expect("churn state");
                        chain
                            .hops
                            .iter()
                            .filter_map(|h| st.crashed.get(&h.peer_id).copied())
                            .collect()
                    };
                    if !crashes.is_empty() {
                        dead += 1;
                    }
                    if crashes.iter().any(|at| *at < began) {
                        dead_before += 1;
                    }
                }
                tokio::time::sleep(period).await;
            }
            let probes = c.probe_stats();
            let probes = (probes.made - probes0.made, probes.silent - probes0.silent);
            let _ = c.shutdown().await;
            task.abort();
            let asker = AskerReport {
                errors,
                least_connected,
            };
            (total, dead, dead_before, took, probes, asker)
        })
    };

    // Rebalancing: every node checks about CHECKS_PER_MINUTE times a
    // simulated minute, from its own info cache (no network traffic), and
    // moves (re-announces another range) when its rebalancer says so.
    // The checks run side by side, as every node of a real swarm checks on
    // its own clock: one after another, a 500-node run whose event loops
    // answer in seconds made one check every few real seconds, so that a
    // node was checked about once in nine simulated minutes and none ever
    // reached its three confirmations (the gap stayed open).
    let checks = Arc::new(RebalanceCounts::default());
    let t_checks = Instant::now();
    let rebalance = {
        let nodes = nodes.clone();
        let state = state.clone();
        let checks = checks.clone();
        let mut stop = stop.clone();
        let period = scaled(Duration::from_secs(1), s);
        let answer_within = scaled(REBALANCE_CHECK_TIMEOUT, s);
        tokio::spawn(async move {
            let mut rng = Lcg::new(0x5eed);
            let mut running = tokio::task::JoinSet::new();
            // Nodes with a check under way: a node checks one at a time.
            let busy: Arc<Mutex<HashSet<PeerId>>> = Arc::default();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                while running.try_join_next().is_some() {}
                // The nodes' lock is never held across a call to a node:
                // the churn and the joins need it too, and an event loop
                // may take seconds to answer on a loaded machine.
                let picked: Vec<Client> = {
                    let ns = nodes.lock().expect("node list");
                    // Each node checks with probability
                    // CHECKS_PER_MINUTE/60 per simulated second.
                    let k = ((ns.len() as f64 * CHECKS_PER_MINUTE / 60.0).round() as usize).max(1);
                    (0..k)
                        .filter(|_| !ns.is_empty())
                        .map(|_| ns[rng.below(ns.len())].client.clone())
                        .collect()
                };
                for client in picked {
                    let peer = client.peer_id();
                    if !busy.lock().expect("busy set").insert(peer) {
                        checks.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let (nodes, state, checks, busy) =
                        (nodes.clone(), state.clone(), checks.clone(), busy.clone());
                    checks.running.fetch_add(1, Ordering::Relaxed);
                    running.spawn(async move {
                        check_once(client, answer_within, &nodes, &state, &checks).await;
                        busy.lock().expect("busy set").remove(&peer);
                        checks.running.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            }
            running.shutdown().await;
        })
    };

    // The churn itself: one crash and one join every `tick`.
    let per_minute = ((cfg.nodes as f64 * cfg.churn_per_minute).round() as usize).max(1);
    let join_counts = Arc::new(JoinCounts::default());
    let tick = minute.div_f64(per_minute as f64);
    let mut joins: Vec<JoinHandle<()>> = Vec::new();
    let t0 = Instant::now();
    for m in 0..cfg.churn_minutes {
        {
            // One sample for the report and the progress line.
            let live = state.lock().expect("churn state").live.len();
            let tasks = tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks();
            let rss = rss_mib();
            report.samples.push((m, live, rss, tasks));
            let l = asker_live.lock().expect("asker progress");
            progress(
                t0,
                &format!(
                    "churn: simulated minute {m}, RSS {rss:.0} MiB, {tasks} tasks, {live} live \
                     nodes, joins {} under way ({} placed, {} given up), {} rebalancing checks \
                     under way; asker: {} chains, {} failed (last: {:?}), {} peers connected, {} \
                     infos cached ({} first-block, {} last-block holders)",
                    join_counts.in_flight.load(Ordering::Relaxed),
                    join_counts.done.load(Ordering::Relaxed),
                    join_counts.failed.load(Ordering::Relaxed),
                    checks.running.load(Ordering::Relaxed),
                    l.ok,
                    l.failed,
                    l.last_error,
                    l.connected,
                    l.cached.0,
                    l.cached.1,
                    l.cached.2
                ),
            );
        }
        // The nodes' own figures, off the driver's path (500 event loops
        // take seconds to answer): connections and how far behind the
        // loops run.
        {
            let clients: Vec<Client> = nodes
                .lock()
                .expect("node list")
                .iter()
                .map(|n| n.client.clone())
                .collect();
            let within = scaled(MINUTE_STATS_TIMEOUT, s);
            tokio::spawn(async move {
                let (stats, lags) = all_stats_timed(&clients, Some(within)).await;
                let lag = Pct::of(lags);
                let stats: Vec<&SwarmStats> = stats.iter().flatten().collect();
                let conns: Vec<usize> = stats.iter().map(|st| st.connected_peers).collect();
                let stored: usize = stats.iter().map(|st| st.stored_records).sum();
                progress(
                    t0,
                    &format!(
                        "churn: simulated minute {m}, nodes' figures: {} of {} answered (those \
                         crashed since do not), event loops answer p50 {:.1} s p99 {:.1} s; \
                         peers connected mean {:.0} most {}; DHT records stored {stored}",
                        conns.len(),
                        clients.len(),
                        lag.p50,
                        lag.p99,
                        conns.iter().sum::<usize>() as f64 / conns.len().max(1) as f64,
                        conns.iter().max().copied().unwrap_or(0),
                    ),
                );
            });
        }
        for _ in 0..per_minute {
            // Crash a random live node.
            {
                let mut ns = nodes.lock().expect("node list");
                if !ns.is_empty() {
                    let i = rng.below(ns.len());
                    let victim = ns.swap_remove(i);
                    if victim.task.is_finished() {
                        report.loops_died += 1;
                    }
                    victim.task.abort();
                    let mut st = state.lock().expect("churn state");
                    let p = victim.client.peer_id();
                    st.live.remove(&p);
                    st.crashed.insert(p, Instant::now());
                    report.crashed += 1;
                }
            }
            // And start a new one, which places itself from its own view.
            let boot = {
                let ns = nodes.lock().expect("node list");
                ns[rng.below(ns.len())].addr.clone()
            };
            let (budget, t) = hardware(rng);
            let nodes2 = nodes.clone();
            let state2 = state.clone();
            let counts = join_counts.clone();
            // Never under a real minute: a join's dials and probes wait on
            // the machine, which the simulated clock does not speed up.
            let deadline = scaled(JOIN_DEADLINE, s).max(Duration::from_secs(60));
            counts.in_flight.fetch_add(1, Ordering::Relaxed);
            joins.push(tokio::spawn(async move {
                let (client, task, addr) = start_stack(true, Some(boot), s).await;
                let placed = tokio::time::timeout(deadline, async {
                    let _ = client.wait_connected(Duration::from_secs(10)).await;
                    // As `--layers auto` does: the bootstrap peer serves
                    // the model, so an empty view is read again. Its wait
                    // is the product's, unscaled: a view waits on the
                    // machine, not on the simulated network.
                    let view = nakshatra_node::placement::view_for_placement(
                        &client,
                        MODEL,
                        &shape(),
                        true,
                        nakshatra_node::placement::VIEW_WAIT,
                        nakshatra_node::placement::VIEW_POLL,
                    )
                    .await
                    .unwrap_or_default();
                    let tput =
                        nakshatra_node::placement::block_throughput(BLOCKS, &view.peers, None);
                    let tput = if tput.len() == BLOCKS as usize {
                        tput
                    } else {
                        vec![0.0; BLOCKS as usize]
                    };
                    let range = place(&tput, budget);
                    client.announce(info_for(&range, t)).await.ok()?;
                    Some(range)
                })
                .await;
                counts.in_flight.fetch_sub(1, Ordering::Relaxed);
                let Ok(Some(range)) = placed else {
                    // Given up: the stack stops (a `JoinHandle` dropped
                    // would leave its event loop running, unseen). Its
                    // announcement may have gone out: to the views it is
                    // a node that crashed now.
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    task.abort();
                    state2
                        .lock()
                        .expect("churn state")
                        .crashed
                        .insert(client.peer_id(), Instant::now());
                    return;
                };
                counts.done.fetch_add(1, Ordering::Relaxed);
                state2
                    .lock()
                    .expect("churn state")
                    .live
                    .insert(client.peer_id(), range.clone());
                nodes2
                    .lock()
                    .expect("node list")
                    .push(Node::new(client, task, addr, budget, t, range, s));
            }));
            tokio::time::sleep(tick).await;
        }
        joins.retain(|j| !j.is_finished());
    }
    if cfg.gap_phase {
        // Every holder of GAP_BLOCK crashes; nobody joins. Rebalancing
        // must cover it again.
        let t_gap = Instant::now();
        let mut killed = 0;
        {
            let mut ns = nodes.lock().expect("node list");
            let mut st = state.lock().expect("churn state");
            let mut i = 0;
            while i < ns.len() {
                if ns[i].range.contains(&GAP_BLOCK) {
                    let victim = ns.swap_remove(i);
                    if victim.task.is_finished() {
                        report.loops_died += 1;
                    }
                    victim.task.abort();
                    let p = victim.client.peer_id();
                    st.live.remove(&p);
                    st.crashed.insert(p, Instant::now());
                    report.crashed += 1;
                    killed += 1;
                } else {
                    i += 1;
                }
            }
        }
        let deadline = t_gap + scaled(Duration::from_secs_f64(60.0 * GAP_WAIT_MINUTES), s);
        let mut healed = None;
        progress(
            t0,
            &format!(
                "gap: {killed} holders of block {GAP_BLOCK} crashed, RSS {:.0} MiB",
                rss_mib()
            ),
        );
        let mut next_note = t_gap + scaled(Duration::from_secs(60), s);
        while Instant::now() < deadline {
            if Instant::now() >= next_note {
                progress(
                    t0,
                    &format!(
                        "gap: block {GAP_BLOCK} still uncovered, RSS {:.0} MiB; rebalancing \
                         checks {} run, {} timed out, {} skipped; {} moves",
                        rss_mib(),
                        checks.done.load(Ordering::Relaxed),
                        checks.timed_out.load(Ordering::Relaxed),
                        checks.skipped.load(Ordering::Relaxed),
                        checks.moves.load(Ordering::Relaxed),
                    ),
                );
                next_note += scaled(Duration::from_secs(60), s);
            }
            let covered = state
                .lock()
                .expect("churn state")
                .live
                .values()
                .any(|r| r.contains(&GAP_BLOCK));
            if covered {
                healed = Some(t_gap.elapsed().as_secs_f64() / s);
                break;
            }
            tokio::time::sleep(scaled(Duration::from_secs(1), s)).await;
        }
        report.gap = Some((killed, healed));
    }
    // One more TTL: every crash of the last minute has had its chance to
    // expire from the views.
    tokio::time::sleep(scaled(SwarmConfig::server().record_ttl, s)).await;
    {
        let live = state.lock().expect("churn state").live.len();
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        report
            .samples
            .push((cfg.churn_minutes, live, rss_mib(), tasks));
    }
    let _ = stop_tx.send(true);
    let (max_seen, seen, max_hidden, max_bare) = observer.await.expect("observer task");
    let (total, dead, dead_before, took, probes, asker) = asker.await.expect("asker task");
    report.churn_plan_errors = asker.errors;
    report.churn_asker_least_connected = asker.least_connected;
    rebalance.await.expect("rebalance task");
    report.checks_per_node_minute = checks.done.load(Ordering::Relaxed) as f64
        / (cfg.nodes as f64 * t_checks.elapsed().as_secs_f64() / minute.as_secs_f64()).max(1e-9);
    report.moves = checks.moves.load(Ordering::Relaxed);
    report.joins = (
        join_counts.done.load(Ordering::Relaxed),
        join_counts.failed.load(Ordering::Relaxed),
    );
    report.rebalance_checks = (
        checks.done.load(Ordering::Relaxed),
        checks.timed_out.load(Ordering::Relaxed),
        checks.skipped.load(Ordering::Relaxed),
    );
    {
        let ns = nodes.lock().expect("node list");
        report.max_moves_per_node = ns.iter().map(|n| n.moves).max().unwrap_or(0);
        (report.end_replicas_min_max, report.end_weakest_block_tput) =
            balance(ns.iter().map(|n| (&n.range, n.tput)));
    }
    report.max_advertised_after_crash = max_seen / s;
    report.seen_after_crash = seen;
    report.max_hidden_block = max_hidden / s;
    report.max_uncovered_block = max_bare / s;
    report.chains = (total, dead);
    report.chains_dead_before = dead_before;
    report.churn_plan = Pct::of(took);
    report.churn_probes = probes;
    for j in joins {
        j.abort();
    }
    for n in nodes.lock().expect("node list").drain(..) {
        if n.task.is_finished() {
            report.loops_died += 1;
        }
        n.task.abort();
    }
}

/// One line of the table `docs/scale.md` shows.
pub fn table_row(r: &SimReport) -> String {
    format!(
        "| {} | {:.1} / {:.1} | {:.2} / {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} ({:.0}) | {}–{} | {:.1} |",
        r.nodes,
        r.coverage.p50,
        r.coverage.p99,
        r.plan.p50,
        r.plan.p99,
        r.walks.mean,
        r.requests_out.mean,
        r.requests_in.mean,
        r.bytes.mean / 1024.0,
        r.connected.mean,
        r.connected.max,
        r.replicas_min_max.0,
        r.replicas_min_max.1,
        r.weakest_block_tput.0,
    )
}

/// This process's CPU time so far, user and system (`/proc/self/stat`;
/// `None` where it cannot be read).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), 1-based
    // from the state field (3): utime is field 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// What else a run measured in steady state, for the line after its
/// table row.
pub fn steady_details(r: &SimReport) -> String {
    format!(
        "time scale {}, incomplete fresh views {:?}, walks max {:.0}, walks by kind (bootstrap, closest, get record, put record, get providers, provide) {:.1?}, requests in max {:.0}, KiB max {:.1}, connections trimmed /node/min {:.1}, reconnections to trimmed peers /node/min {:.1}, CPU ms /node/min {:.0} ({:.2} cores), routing table mean {:.0} (most {:.0}), serving caches complete min {:.3} mean {:.3}, gossip received /node/min {:.0} dropped {:.1} (control {:.1}), gossip mesh {:.1}, event loop answers p50 {:.3} s p99 {:.3} s, event loops died {}, failed plans {:?}",
        r.time_scale,
        r.coverage_incomplete,
        r.walks.max,
        r.walks_by_kind,
        r.requests_in.max,
        r.bytes.max / 1024.0,
        r.trimmed.mean,
        r.reconnections.mean,
        r.cpu_ms_per_node,
        r.cpu_cores,
        r.routing_table.mean,
        r.routing_table.max,
        r.cache_complete.0,
        r.cache_complete.1,
        r.gossip_received.mean,
        r.gossip_dropped.mean,
        r.gossip_dropped_control.mean,
        r.gossip_mesh.mean,
        r.loop_lag.p50,
        r.loop_lag.p99,
        r.loops_died,
        r.plan_errors
    ) + &r.least_cache.as_ref().map_or(String::new(), |l| {
        format!(
            ", least complete cache: {} infos, that node {} peers connected, {} in its routing table, gossip mesh {}, {} infos received in the minute",
            l.infos, l.connected, l.routing_table, l.gossip_mesh, l.gossip_received
        )
    })
}

/// The table's header.
pub const TABLE_HEADER: &str = "| nodes | fresh node: full map p50 / p99 (s) | plan p50 / p99 (s) | DHT walks /node/min | DHT requests out /node/min | DHT requests in /node/min | KiB sent /node/min | peers connected /node (most) | replicas min–max | weakest block tok/s |\n|---|---|---|---|---|---|---|---|---|---|";
