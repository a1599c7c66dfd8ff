//! Chain planning: which peers, in which order, run a model's blocks
//! `0..n_layers` for one asker, as fast as possible per decode token.
//!
//! # Model
//!
//! A hop serves its whole announced range `[start, end)`: our engine cannot
//! start mid-range, so a chain is a sequence of peers whose ranges tile
//! `0..n_layers` exactly (each hop starts where the previous one ended).
//!
//! Cost of a chain, in seconds per decode token (Petals' `min_latency`
//! routing, with its `next_pings`):
//!
//! ```text
//! est = Σ_hops ( rtt(prev → hop) + 1 / throughput(hop) ) + rtt(last hop → asker)
//! ```
//!
//! - `rtt(asker → first hop)`: `first_rtts[first]`, measured by the asker;
//! - `rtt(hop i → hop i+1)`: hop i's announced `next_rtts` entry for hop
//!   i+1;
//! - `rtt(last hop → asker)`: `first_rtts[last]` (the return leg);
//! - any RTT not known: [`PlanOptions::default_rtt`] (50 ms; Petals uses
//!   150 ms).
//! - `throughput`: the hop's announced tokens/s through its whole range.
//!
//! RTTs stand in for one-way latencies (each leg counted as a full round
//! trip, as Petals does): conservative, and the same on every leg, so the
//! ranking is unaffected.
//!
//! # Search
//!
//! The link cost into a hop depends on the hop before it, so the search
//! runs Dijkstra over states "a chain reached block boundary `b` with last
//! hop `p`" (`b = p.end`), plus the start state (boundary 0, at the asker):
//! exact, and `O(P log P + E)` for `P` usable peers and `E` pairs of peers
//! where one ends where the other starts. Ties go to the lexicographically
//! smaller peer ids (last hop first), and the input order does not matter.

use std::{
    cmp::{Ordering, Reverse},
    collections::{BinaryHeap, HashMap, HashSet},
    fmt,
    time::Duration,
};

use libp2p::{Multiaddr, PeerId};
use nakshatra_protocol::ServerState;
use serde::{Serialize, Serializer};

use crate::{
    error::LookupError,
    view::{ModelShape, ModelView},
    PeerView,
};

/// Link RTT assumed where none was measured (see [`PlanOptions`]).
pub const DEFAULT_RTT: Duration = Duration::from_millis(50);

/// Knobs of [`plan_chain`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// RTT assumed for a link nobody measured (a first or last hop missing
    /// from `first_rtts`, a hop pair missing from `next_rtts`). Default
    /// [`DEFAULT_RTT`] (50 ms).
    pub default_rtt: Duration,
    /// Peers not to use (e.g. a hop that just failed: the asker plans again
    /// without it).
    pub exclude: HashSet<PeerId>,
    /// Tokens every hop must give a session (the prompt's length): peers
    /// announcing a smaller context are planned around. Default 0.
    pub min_context: u32,
    /// The model's shape from its verified manifest: [`Client::plan`]
    /// builds the view on it ([`crate::view::build_model_view_with`]), so
    /// peers announcing another layer count or architecture are left out
    /// however many they are. `None` (the default): the announcers'
    /// majority vote, which Sybils can win; an asker always passes it.
    ///
    /// [`Client::plan`]: crate::Client::plan
    pub shape: Option<ModelShape>,
    /// Seconds per decode token the asker measured for a peer's whole
    /// range: used instead of the peer's announced throughput (a figure
    /// measured beats one announced). Default empty.
    pub measured: HashMap<PeerId, f64>,
    /// Seconds added to a peer's cost (a hop that failed recently): the
    /// planner goes round it when another chain exists and still uses it
    /// when it is the only way through. Default empty.
    pub penalty: HashMap<PeerId, f64>,
    /// Hops to keep, each with its range (repairing a chain that lost a
    /// hop: the hops still up keep their sessions). The chain is first
    /// planned keeping them all, only the blocks none of them covers being
    /// planned (a peer whose range overlaps a kept hop's is not used);
    /// when no peer fits those blocks, the whole chain is planned as if
    /// `keep` were empty (a replacement may cover a wider range). Default
    /// empty.
    pub keep: Vec<(PeerId, [u32; 2])>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            default_rtt: DEFAULT_RTT,
            exclude: HashSet::new(),
            min_context: 0,
            shape: None,
            measured: HashMap::new(),
            penalty: HashMap::new(),
            keep: Vec::new(),
        }
    }
}

/// One hop of a [`Chain`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hop {
    /// The peer that runs this hop's blocks.
    pub peer_id: PeerId,
    /// First block it runs (inclusive).
    pub start: u32,
    /// End of its range (exclusive).
    pub end: u32,
    /// Its announced listen addresses (the unparsable ones left out).
    pub addrs: Vec<Multiaddr>,
    /// Its announced throughput, tokens/s.
    pub throughput: f64,
    /// Measured RTT of the link into this hop (from the asker for the first
    /// hop, from the previous hop otherwise); `None` when none was known
    /// and [`PlanOptions::default_rtt`] was assumed. JSON: `rtt_ms`.
    #[serde(rename = "rtt_ms", serialize_with = "ser_opt_ms")]
    pub rtt: Option<Duration>,
    /// Context tokens each session gets on this hop.
    pub context_per_session: u32,
}

/// A planned chain: hops in order, covering every block exactly once.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chain {
    /// The hops, first (runs block 0) to last (runs the model's last block
    /// and samples).
    pub hops: Vec<Hop>,
    /// Estimated seconds per decode token, return leg included (see the
    /// module doc).
    pub est_secs_per_token: f64,
}

/// Why no chain could be planned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// Nobody serves the model (or it is unknown).
    #[error("model {model_id} is not served by any peer")]
    NoModel {
        /// The model id asked for (64 lowercase hex).
        model_id: String,
    },
    /// Some blocks cannot be run: no usable peer (online,
    /// throughput > 0, not excluded, reachable) holds them, or
    /// those that do cannot be chained (their ranges start mid-way through
    /// every usable range before them).
    #[error(
        "{} of model {model_id} are not served by any reachable peer",
        Blocks(missing)
    )]
    Uncovered {
        /// The model id asked for (64 lowercase hex).
        model_id: String,
        /// Maximal runs of such blocks, half-open `[start, end)`, sorted.
        missing: Vec<[u32; 2]>,
    },
    /// The model's view could not be read (bad model id, event loop
    /// stopped).
    #[error(transparent)]
    Lookup(#[from] LookupError),
}

struct Blocks<'a>(&'a [[u32; 2]]);

impl fmt::Display for Blocks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u32 = self.0.iter().map(|[a, b]| b - a).sum();
        f.write_str(if total == 1 { "block " } else { "blocks " })?;
        for (i, [a, b]) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            if b - a == 1 {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}..{b}")?;
            }
        }
        Ok(())
    }
}

fn ser_opt_ms<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

/// f64 with a total order (costs are finite and >= 0).
#[derive(Clone, Copy, PartialEq)]
struct Cost(f64);
impl Eq for Cost {}
impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cost {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// What a peer announcing no free session adds to its cost: its record
/// may be a few seconds old (sessions come and go), so it is still
/// planned when nobody else can serve, and refuses at `Open` if it is
/// really full.
pub const FULL_PENALTY: f64 = 5.0;

/// A hop's own seconds per token in a chain's cost: the asker's measured
/// figure if it has one, else 1 / announced throughput; plus any penalty
/// (`opts.penalty`, [`FULL_PENALTY`]).
fn hop_cost(p: &PeerView, opts: &PlanOptions) -> f64 {
    let own = match opts.measured.get(&p.peer_id) {
        Some(m) if m.is_finite() && *m >= 0.0 => *m,
        _ => 1.0 / p.throughput,
    };
    let penalty = opts.penalty.get(&p.peer_id).copied().unwrap_or(0.0);
    let penalty = if penalty.is_finite() {
        penalty.max(0.0)
    } else {
        0.0
    };
    let full = if p.free_sessions == 0 {
        FULL_PENALTY
    } else {
        0.0
    };
    own + penalty + full
}

/// Whether a chain may use `p` at all.
pub(crate) fn usable(p: &PeerView, n_layers: u32, opts: &PlanOptions) -> bool {
    p.state == ServerState::Online
        && p.throughput.is_finite()
        && p.throughput > 0.0
        && p.range[0] < p.range[1]
        && p.range[1] <= n_layers
        && p.context_per_session >= opts.min_context
        && !opts.exclude.contains(&p.peer_id)
}

/// Whether `p` may join a chain that keeps `keep`: a kept peer with its
/// kept range, or any other peer whose range overlaps no kept range.
fn fits_kept(p: &PeerView, keep: &[(PeerId, [u32; 2])]) -> bool {
    match keep.iter().find(|(id, _)| *id == p.peer_id) {
        Some((_, range)) => *range == p.range,
        None => keep
            .iter()
            .all(|(_, [a, b])| p.range[1] <= *a || p.range[0] >= *b),
    }
}

/// Plans the chain with the lowest estimated seconds per decode token
/// through `view`'s model (cost model and search: see the module doc).
///
/// `first_rtts`: RTTs the asker measured to peers (first-hop links and the
/// return leg). Peers that are not online, announce
/// no throughput, or are in `opts.exclude` are not used.
///
/// Errors: [`PlanError::NoModel`] when the view has no layers or no peers;
/// [`PlanError::Uncovered`] naming the blocks no usable peer holds (or, if
/// every block is held but the ranges do not chain, the blocks no chain
/// from block 0 reaches).
pub fn plan_chain(
    view: &ModelView,
    first_rtts: &HashMap<PeerId, Duration>,
    opts: &PlanOptions,
) -> Result<Chain, PlanError> {
    if !opts.keep.is_empty() {
        if let Ok(c) = plan_among(view, first_rtts, opts, &opts.keep) {
            return Ok(c);
        }
    }
    plan_among(view, first_rtts, opts, &[])
}

/// [`plan_chain`] among the peers that fit `keep` (see [`fits_kept`]).
fn plan_among(
    view: &ModelView,
    first_rtts: &HashMap<PeerId, Duration>,
    opts: &PlanOptions,
    keep: &[(PeerId, [u32; 2])],
) -> Result<Chain, PlanError> {
    let n = view.n_layers;
    if n == 0 || view.peers.is_empty() {
        return Err(PlanError::NoModel {
            model_id: view.id.clone(),
        });
    }
    let mut peers: Vec<&PeerView> = view
        .peers
        .iter()
        .filter(|p| usable(p, n, opts) && fits_kept(p, keep))
        .collect();
    peers.sort_by_cached_key(|p| p.peer_id.to_base58());
    peers.dedup_by_key(|p| p.peer_id);

    let uncovered = |missing: Vec<[u32; 2]>| PlanError::Uncovered {
        model_id: view.id.clone(),
        missing,
    };
    let gaps = runs_not_covered(n, peers.iter().map(|p| p.range));
    if !gaps.is_empty() {
        return Err(uncovered(gaps));
    }

    // State 0: the asker at boundary 0; state i + 1: hop peers[i] done, at
    // boundary peers[i].range[1].
    let mut by_start: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, p) in peers.iter().enumerate() {
        by_start.entry(p.range[0]).or_default().push(i);
    }
    let next_rtt_of = |from: &PeerView, to: &PeerView| -> Option<Duration> {
        let to = to.peer_id.to_base58();
        from.next_rtts
            .iter()
            .find(|r| r.peer_id == to)
            .map(|r| Duration::from_secs_f64(f64::from(r.rtt_ms.max(0.0)) / 1000.0))
    };
    let link = |prev: Option<usize>, to: usize| -> Option<Duration> {
        match prev {
            None => first_rtts.get(&peers[to].peer_id).copied(),
            Some(p) => next_rtt_of(peers[p], peers[to]),
        }
    };
    let hop_secs = |p: &PeerView| hop_cost(p, opts);
    let default_rtt = opts.default_rtt.as_secs_f64();
    let secs = |d: Option<Duration>| d.map_or(default_rtt, |d| d.as_secs_f64());

    let states = peers.len() + 1;
    let mut dist = vec![f64::INFINITY; states];
    let mut prev: Vec<Option<usize>> = vec![None; states];
    let mut done = vec![false; states];
    let mut heap = BinaryHeap::new();
    dist[0] = 0.0;
    heap.push(Reverse((Cost(0.0), 0usize)));
    while let Some(Reverse((Cost(d), s))) = heap.pop() {
        if done[s] {
            continue;
        }
        done[s] = true;
        let (from, boundary) = match s {
            0 => (None, 0),
            s => (Some(s - 1), peers[s - 1].range[1]),
        };
        let Some(next) = by_start.get(&boundary) else {
            continue;
        };
        for &v in next {
            let cost = d + secs(link(from, v)) + hop_secs(peers[v]);
            if cost < dist[v + 1] {
                dist[v + 1] = cost;
                prev[v + 1] = Some(s);
                heap.push(Reverse((Cost(cost), v + 1)));
            }
        }
    }

    // Best end state, return leg included; ties to the smaller peer id.
    let mut best: Option<(f64, usize)> = None;
    for (i, p) in peers.iter().enumerate() {
        if p.range[1] != n || !dist[i + 1].is_finite() {
            continue;
        }
        let total = dist[i + 1] + secs(first_rtts.get(&p.peer_id).copied());
        if best.is_none_or(|(b, _)| total < b) {
            best = Some((total, i + 1));
        }
    }
    let Some((est, last)) = best else {
        return Err(uncovered(unchained_blocks(n, &peers)));
    };

    let mut order = Vec::new();
    let mut s = last;
    while s != 0 {
        order.push(s - 1);
        s = prev[s].expect("every reached state has a predecessor");
    }
    order.reverse();
    let hops = order
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            let p = peers[i];
            Hop {
                peer_id: p.peer_id,
                start: p.range[0],
                end: p.range[1],
                addrs: p
                    .listen_addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect(),
                throughput: p.throughput,
                rtt: link(k.checked_sub(1).map(|k| order[k]), i),
                context_per_session: p.context_per_session,
            }
        })
        .collect();
    Ok(Chain {
        hops,
        est_secs_per_token: est,
    })
}

/// Maximal runs of blocks in `0..n` that no range covers.
fn runs_not_covered(n: u32, ranges: impl Iterator<Item = [u32; 2]>) -> Vec<[u32; 2]> {
    let mut covered = vec![false; n as usize];
    for [a, b] in ranges {
        for c in &mut covered[a.min(n) as usize..b.min(n) as usize] {
            *c = true;
        }
    }
    let mut out = Vec::new();
    let mut start: Option<u32> = None;
    for (b, &c) in covered.iter().enumerate() {
        match (c, start) {
            (false, None) => start = Some(b as u32),
            (true, Some(s)) => {
                out.push([s, b as u32]);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push([s, n]);
    }
    out
}

/// Every block is held but no chain reaches the end: the blocks not held
/// by a peer whose range starts at a boundary some chain from 0 reaches.
/// Never empty in that case (the first block past the furthest reachable
/// boundary is one of them).
fn unchained_blocks(n: u32, peers: &[&PeerView]) -> Vec<[u32; 2]> {
    let mut reachable: HashSet<u32> = HashSet::from([0]);
    loop {
        let before = reachable.len();
        for p in peers {
            if reachable.contains(&p.range[0]) {
                reachable.insert(p.range[1]);
            }
        }
        if reachable.len() == before {
            break;
        }
    }
    runs_not_covered(
        n,
        peers
            .iter()
            .filter(|p| reachable.contains(&p.range[0]))
            .map(|p| p.range),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nakshatra_protocol::NextRtt;

    fn peer(seed: u8) -> PeerId {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        nakshatra_protocol::peer_id_of(&sk.verifying_key().to_bytes()).unwrap()
    }

    fn pv(id: PeerId, a: u32, b: u32, tp: f64) -> PeerView {
        PeerView {
            peer_id: id,
            range: [a, b],
            backend: "CPU".into(),
            throughput: tp,
            rtt_ms: None,
            via: None,
            state: ServerState::Online,
            free_sessions: 1,
            max_sessions: 1,
            context_per_session: 2048,
            n_embd: 64,
            devices: Vec::new(),
            listen_addrs: vec![format!("/ip4/127.0.0.1/tcp/{}", 4000 + a)],
            issued_at_ms: 1,
            expires_at_ms: 2,
            next_rtts: Vec::new(),
        }
    }

    fn view(n: u32, peers: Vec<PeerView>) -> ModelView {
        ModelView {
            id: "ab".repeat(32),
            arch: "llama".into(),
            n_layers: n,
            coverage: Vec::new(),
            peers,
            gaps: Vec::new(),
            ..ModelView::default()
        }
    }

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    fn ids(c: &Chain) -> Vec<PeerId> {
        c.hops.iter().map(|h| h.peer_id).collect()
    }

    fn no_rtts() -> HashMap<PeerId, Duration> {
        HashMap::new()
    }

    /// A liar announcing the whole model at a great rate wins until the
    /// asker has measured it; a penalised hop is gone round while another
    /// way exists and still used when it is the only one.
    #[test]
    fn measured_figures_and_penalties_beat_announcements() {
        let (liar, a, b) = (peer(1), peer(2), peer(3));
        let v = view(
            30,
            vec![
                pv(liar, 0, 30, 50_000.0),
                pv(a, 0, 15, 100.0),
                pv(b, 15, 30, 100.0),
            ],
        );
        let rtts = HashMap::from([(liar, ms(1)), (a, ms(1)), (b, ms(1))]);
        let mut opts = PlanOptions::default();
        assert_eq!(ids(&plan_chain(&v, &rtts, &opts).unwrap()), vec![liar]);
        opts.measured.insert(liar, 0.4);
        assert_eq!(ids(&plan_chain(&v, &rtts, &opts).unwrap()), vec![a, b]);
        // Measured fast again: back in favour.
        opts.measured.insert(liar, 0.001);
        assert_eq!(ids(&plan_chain(&v, &rtts, &opts).unwrap()), vec![liar]);
        opts.penalty.insert(liar, 10.0);
        assert_eq!(ids(&plan_chain(&v, &rtts, &opts).unwrap()), vec![a, b]);
        // Everyone penalised: still a chain, the cheapest.
        opts.penalty.insert(a, 10.0);
        opts.penalty.insert(b, 10.0);
        assert_eq!(ids(&plan_chain(&v, &rtts, &opts).unwrap()), vec![liar]);
        // Figures that are not numbers are ignored, not trusted.
        opts.penalty.clear();
        opts.measured.insert(liar, f64::NAN);
        opts.penalty.insert(a, f64::INFINITY);
        assert_eq!(ids(&plan_chain(&v, &rtts, &opts).unwrap()), vec![liar]);
    }

    /// A repair keeps the hops still up and plans only the lost blocks:
    /// however fast a peer covering more is, it is not used.
    #[test]
    fn a_repair_plans_only_the_lost_blocks() {
        let (a, lost, c, s1, s2, wide) = (peer(1), peer(2), peer(3), peer(4), peer(5), peer(6));
        let v = view(
            30,
            vec![
                pv(a, 0, 10, 10.0),
                pv(lost, 10, 20, 10.0),
                pv(c, 20, 30, 10.0),
                pv(s1, 10, 15, 10.0),
                pv(s2, 15, 20, 10.0),
                pv(wide, 0, 30, 1000.0),
            ],
        );
        let mut opts = PlanOptions::default();
        assert_eq!(ids(&plan_chain(&v, &no_rtts(), &opts).unwrap()), vec![wide]);
        opts.keep = vec![(a, [0, 10]), (c, [20, 30])];
        opts.exclude.insert(lost);
        let chain = plan_chain(&v, &no_rtts(), &opts).unwrap();
        assert_eq!(ids(&chain), vec![a, s1, s2, c]);
        // Nobody fits the lost blocks between the kept hops: the whole
        // chain is planned again (here the wide peer).
        opts.exclude.insert(s2);
        assert_eq!(ids(&plan_chain(&v, &no_rtts(), &opts).unwrap()), vec![wide]);
        // A kept peer must still announce its kept range.
        opts.exclude.remove(&s2);
        opts.keep = vec![(a, [0, 5]), (c, [20, 30])];
        assert_eq!(ids(&plan_chain(&v, &no_rtts(), &opts).unwrap()), vec![wide]);
        // Nobody at all for the lost blocks: they are named.
        opts.exclude.extend([s2, wide]);
        match plan_chain(&v, &no_rtts(), &opts) {
            Err(PlanError::Uncovered { missing, .. }) => assert_eq!(missing, vec![[15, 20]]),
            r => panic!("{r:?}"),
        }
    }

    /// A relayed link is priced by what was measured over it, the relay's
    /// detour included (the asker's probes and a hop's next-hop probes go
    /// over whatever connection there is): a replica reached through a
    /// relay loses to a direct one of the same speed, and wins when it is
    /// the nearer one all the same; it is never excluded for being
    /// relayed.
    #[test]
    fn relayed_links_are_priced_by_their_measured_rtt() {
        let (a, direct, relayed) = (peer(1), peer(2), peer(3));
        let next = |to: PeerId, rtt_ms: f32| NextRtt {
            peer_id: to.to_base58(),
            rtt_ms,
        };
        let build = |direct_ms: f32, relayed_ms: f32| {
            let mut first = pv(a, 0, 10, 10.0);
            first.next_rtts = vec![next(direct, direct_ms), next(relayed, relayed_ms)];
            let mut r = pv(relayed, 10, 30, 10.0);
            r.via = Some(crate::view::Via::Relay);
            view(30, vec![first, pv(direct, 10, 30, 10.0), r])
        };
        let rtts = |direct_ms: u64, relayed_ms: u64| {
            HashMap::from([
                (a, ms(5)),
                (direct, ms(direct_ms)),
                (relayed, ms(relayed_ms)),
            ])
        };
        // Same hops, the relay doubles the legs: the direct replica.
        let chain = plan_chain(&build(5.0, 25.0), &rtts(5, 25), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a, direct]);
        // A far direct replica (across an ocean) against a relayed one
        // nearby: the relayed one.
        let chain =
            plan_chain(&build(180.0, 30.0), &rtts(180, 30), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a, relayed]);
        assert_eq!(chain.hops[1].rtt, Some(ms(30)));
    }

    #[test]
    fn simple_cover() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let v = view(
            30,
            vec![pv(c, 20, 30, 10.0), pv(a, 0, 10, 10.0), pv(b, 10, 20, 10.0)],
        );
        let rtts = HashMap::from([(a, ms(10)), (c, ms(30))]);
        let chain = plan_chain(&v, &rtts, &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a, b, c]);
        assert_eq!(
            chain
                .hops
                .iter()
                .map(|h| [h.start, h.end])
                .collect::<Vec<_>>(),
            vec![[0, 10], [10, 20], [20, 30]]
        );
        // 10 ms in, 50 ms (default) a->b and b->c, 3 x 0.1 s compute, 30 ms back.
        let want = 0.010 + 0.050 + 0.050 + 0.3 + 0.030;
        assert!((chain.est_secs_per_token - want).abs() < 1e-9, "{chain:?}");
        assert_eq!(chain.hops[0].rtt, Some(ms(10)));
        assert_eq!(chain.hops[1].rtt, None);
        assert_eq!(
            chain.hops[0].addrs,
            vec!["/ip4/127.0.0.1/tcp/4000".parse::<Multiaddr>().unwrap()]
        );
        assert_eq!(chain.hops[2].context_per_session, 2048);

        let json = serde_json::to_value(&chain).unwrap();
        assert_eq!(json["hops"][0]["peer_id"], serde_json::json!(a.to_base58()));
        assert_eq!(json["hops"][0]["rtt_ms"], serde_json::json!(10.0));
        assert_eq!(json["hops"][1]["rtt_ms"], serde_json::Value::Null);
        assert_eq!(
            json["hops"][0]["addrs"],
            serde_json::json!(["/ip4/127.0.0.1/tcp/4000"])
        );
        assert!(json["est_secs_per_token"].is_f64());

        // One peer holding everything.
        let whole = view(30, vec![pv(a, 0, 30, 5.0)]);
        let chain = plan_chain(&whole, &no_rtts(), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a]);
        assert!((chain.est_secs_per_token - (0.05 + 0.2 + 0.05)).abs() < 1e-9);
    }

    #[test]
    fn picks_the_replica_with_the_faster_link() {
        let (a, slow, fast, d) = (peer(1), peer(2), peer(3), peer(4));
        let mut first = pv(a, 0, 10, 10.0);
        first.next_rtts = vec![
            NextRtt {
                peer_id: slow.to_base58(),
                rtt_ms: 300.0,
            },
            NextRtt {
                peer_id: fast.to_base58(),
                rtt_ms: 2.0,
            },
        ];
        let v = view(
            30,
            vec![
                first,
                pv(slow, 10, 20, 10.0),
                pv(fast, 10, 20, 10.0),
                pv(d, 20, 30, 10.0),
            ],
        );
        let rtts = HashMap::from([(a, ms(1)), (d, ms(1))]);
        let chain = plan_chain(&v, &rtts, &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a, fast, d]);
        assert_eq!(chain.hops[1].rtt, Some(Duration::from_secs_f64(0.002)));

        // First hop by the asker's RTTs.
        let (x, y) = (peer(5), peer(6));
        let v = view(10, vec![pv(x, 0, 10, 10.0), pv(y, 0, 10, 10.0)]);
        let rtts = HashMap::from([(x, ms(80)), (y, ms(5))]);
        let chain = plan_chain(&v, &rtts, &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![y]);
        // Unknown RTT is the default: 50 ms beats a measured 80 ms.
        let rtts = HashMap::from([(x, ms(80))]);
        let chain = plan_chain(&v, &rtts, &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![y]);
        let opts = PlanOptions {
            default_rtt: ms(150),
            ..PlanOptions::default()
        };
        let chain = plan_chain(&v, &rtts, &opts).unwrap();
        assert_eq!(ids(&chain), vec![x]);
    }

    #[test]
    fn picks_by_throughput() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        // One fast peer for everything vs two slow halves.
        let v = view(
            20,
            vec![pv(a, 0, 20, 20.0), pv(b, 0, 10, 4.0), pv(c, 10, 20, 4.0)],
        );
        let chain = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a]);
        // Two fast halves vs one slow whole: 2 x (50 ms + 10 ms) + 50 ms <
        // 50 ms + 1 s + 50 ms.
        let v = view(
            20,
            vec![pv(a, 0, 20, 1.0), pv(b, 0, 10, 100.0), pv(c, 10, 20, 100.0)],
        );
        let chain = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![b, c]);
        // Same range, different speed.
        let v = view(10, vec![pv(a, 0, 10, 9.0), pv(b, 0, 10, 11.0)]);
        let chain = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![b]);
    }

    #[test]
    fn avoids_full_offline_and_idle_peers() {
        let (a, b, c, d, e) = (peer(1), peer(2), peer(3), peer(4), peer(5));
        let mut full = pv(a, 0, 10, 100.0);
        full.free_sessions = 0;
        let mut joining = pv(b, 0, 10, 100.0);
        joining.state = ServerState::Joining;
        let mut offline = pv(c, 0, 10, 100.0);
        offline.state = ServerState::Offline;
        let idle = pv(d, 0, 10, 0.0);
        let v = view(10, vec![full, joining, offline, idle, pv(e, 0, 10, 1.0)]);
        let chain = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![e]);

        let mut nan = pv(e, 0, 10, 1.0);
        nan.throughput = f64::NAN;
        let only_bad = view(10, vec![nan, pv(a, 0, 10, 0.0)]);
        match plan_chain(&only_bad, &no_rtts(), &PlanOptions::default()) {
            Err(PlanError::Uncovered { missing, .. }) => assert_eq!(missing, vec![[0, 10]]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hops_too_short_for_the_prompt_are_planned_around() {
        let (a, b) = (peer(1), peer(2));
        let mut small = pv(a, 0, 10, 100.0);
        small.context_per_session = 16;
        let v = view(10, vec![small, pv(b, 0, 10, 1.0)]);
        let chain = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a]);
        let opts = PlanOptions {
            min_context: 100,
            ..PlanOptions::default()
        };
        let chain = plan_chain(&v, &no_rtts(), &opts).unwrap();
        assert_eq!(ids(&chain), vec![b]);
    }

    #[test]
    fn exclude_list() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let v = view(
            20,
            vec![pv(a, 0, 20, 100.0), pv(b, 0, 10, 10.0), pv(c, 10, 20, 10.0)],
        );
        let chain = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap();
        assert_eq!(ids(&chain), vec![a]);
        let opts = PlanOptions {
            exclude: HashSet::from([a]),
            ..PlanOptions::default()
        };
        let chain = plan_chain(&v, &no_rtts(), &opts).unwrap();
        assert_eq!(ids(&chain), vec![b, c]);
        let opts = PlanOptions {
            exclude: HashSet::from([a, c]),
            ..PlanOptions::default()
        };
        let err = plan_chain(&v, &no_rtts(), &opts).unwrap_err();
        assert!(
            matches!(&err, PlanError::Uncovered { missing, .. } if *missing == vec![[10, 20]]),
            "{err:?}"
        );
    }

    #[test]
    fn uncovered_lists_exact_gaps() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let v = view(
            30,
            vec![pv(a, 0, 12, 10.0), pv(b, 18, 25, 10.0), pv(c, 26, 29, 10.0)],
        );
        let err = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap_err();
        match &err {
            PlanError::Uncovered { model_id, missing } => {
                assert_eq!(model_id, &"ab".repeat(32));
                assert_eq!(missing, &vec![[12, 18], [25, 26], [29, 30]]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "blocks 12..18, 25, 29 of model {} are not served by any reachable peer",
                "ab".repeat(32)
            )
        );
        let v = view(30, vec![pv(a, 0, 12, 10.0), pv(b, 18, 30, 10.0)]);
        let err = plan_chain(&v, &no_rtts(), &PlanOptions::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "blocks 12..18 of model {} are not served by any reachable peer",
                "ab".repeat(32)
            )
        );

        // Every block held, but b starts mid-way through a's range: nothing
        // chains past a.
        let v = view(20, vec![pv(a, 0, 10, 10.0), pv(b, 5, 20, 10.0)]);
        match plan_chain(&v, &no_rtts(), &PlanOptions::default()) {
            Err(PlanError::Uncovered { missing, .. }) => assert_eq!(missing, vec![[10, 20]]),
            other => panic!("{other:?}"),
        }

        // No model.
        let err = plan_chain(&view(0, vec![]), &no_rtts(), &PlanOptions::default()).unwrap_err();
        assert!(matches!(err, PlanError::NoModel { .. }), "{err:?}");
        assert!(err.to_string().contains("not served by any peer"));
    }

    #[test]
    fn ties_break_by_peer_id_whatever_the_order() {
        let ps: Vec<PeerId> = (1..=6).map(peer).collect();
        let mut sorted = ps.clone();
        sorted.sort_by_key(|p| p.to_base58());
        // Three identical replicas of each half.
        let mut peers = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            let (a, b) = if i % 2 == 0 { (0, 10) } else { (10, 20) };
            peers.push(pv(*p, a, b, 10.0));
        }
        let first_half: Vec<PeerId> = ps.iter().step_by(2).copied().collect();
        let second_half: Vec<PeerId> = ps.iter().skip(1).step_by(2).copied().collect();
        let min = |v: &[PeerId]| *v.iter().min_by_key(|p| p.to_base58()).unwrap();
        let want = vec![min(&first_half), min(&second_half)];
        let mut rng = Rng(7);
        for _ in 0..20 {
            rng.shuffle(&mut peers);
            let chain = plan_chain(
                &view(20, peers.clone()),
                &no_rtts(),
                &PlanOptions::default(),
            )
            .unwrap();
            assert_eq!(ids(&chain), want);
        }
    }

    /// Tiny deterministic PRNG (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = self.below(i as u64 + 1) as usize;
                v.swap(i, j);
            }
        }
    }

    /// Cheapest chain by enumerating every chain (ranges tiling 0..n).
    fn brute_force(
        v: &ModelView,
        first: &HashMap<PeerId, Duration>,
        opts: &PlanOptions,
    ) -> Option<f64> {
        struct Search<'a> {
            peers: Vec<&'a PeerView>,
            n: u32,
            first: &'a HashMap<PeerId, Duration>,
            default: f64,
            best: Option<f64>,
            opts: &'a PlanOptions,
        }
        impl Search<'_> {
            fn go(&mut self, prev: Option<&PeerView>, at: u32, cost: f64) {
                if at == self.n {
                    let back = self
                        .first
                        .get(&prev.unwrap().peer_id)
                        .map_or(self.default, |r| r.as_secs_f64());
                    let total = cost + back;
                    if self.best.is_none_or(|b| total < b) {
                        self.best = Some(total);
                    }
                    return;
                }
                let next: Vec<&PeerView> = self
                    .peers
                    .iter()
                    .filter(|p| p.range[0] == at)
                    .copied()
                    .collect();
                for p in next {
                    let link = match prev {
                        None => self
                            .first
                            .get(&p.peer_id)
                            .map_or(self.default, |r| r.as_secs_f64()),
                        Some(q) => q
                            .next_rtts
                            .iter()
                            .find(|r| r.peer_id == p.peer_id.to_base58())
                            .map_or(self.default, |r| f64::from(r.rtt_ms) / 1000.0),
                    };
                    self.go(Some(p), p.range[1], cost + link + hop_cost(p, self.opts));
                }
            }
        }
        let mut search = Search {
            peers: v
                .peers
                .iter()
                .filter(|p| usable(p, v.n_layers, opts))
                .collect(),
            n: v.n_layers,
            first,
            default: opts.default_rtt.as_secs_f64(),
            best: None,
            opts,
        };
        search.go(None, 0, 0.0);
        search.best
    }

    /// What a chain costs, recomputed from its hops.
    fn chain_cost(
        v: &ModelView,
        c: &Chain,
        first: &HashMap<PeerId, Duration>,
        opts: &PlanOptions,
    ) -> f64 {
        let d = opts.default_rtt.as_secs_f64();
        let get = |id: PeerId| v.peers.iter().find(|p| p.peer_id == id).unwrap();
        let mut cost = 0.0;
        for (k, h) in c.hops.iter().enumerate() {
            cost += h.rtt.map_or(d, |r| r.as_secs_f64()) + hop_cost(get(h.peer_id), opts);
            if k == 0 {
                assert_eq!(h.start, 0);
            } else {
                assert_eq!(h.start, c.hops[k - 1].end);
            }
        }
        let last = c.hops.last().unwrap();
        assert_eq!(last.end, v.n_layers);
        cost + first.get(&last.peer_id).map_or(d, |r| r.as_secs_f64())
    }

    #[test]
    fn random_cases_match_brute_force() {
        let ids: Vec<PeerId> = (1..=20).map(peer).collect();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let (mut planned, mut failed) = (0, 0);
        for case in 0..400 {
            let n = 30;
            // Boundaries from a small set, so that ranges chain often.
            let cuts = [0u32, 5, 10, 12, 15, 18, 20, 24, 25, 30];
            let mut peers = Vec::new();
            for id in &ids {
                let i = rng.below(cuts.len() as u64 - 1) as usize;
                let j = i + 1 + rng.below((cuts.len() - 1 - i).min(3) as u64) as usize;
                let mut p = pv(*id, cuts[i], cuts[j], 1.0 + rng.below(50) as f64);
                p.free_sessions = u32::from(rng.below(8) != 0);
                if rng.below(10) == 0 {
                    p.state = ServerState::Joining;
                }
                peers.push(p);
            }
            for p in &mut peers {
                let mut next = Vec::new();
                for other in &ids {
                    if rng.below(3) == 0 && next.len() < 16 {
                        next.push(NextRtt {
                            peer_id: other.to_base58(),
                            rtt_ms: rng.below(200) as f32 * 0.5,
                        });
                    }
                }
                p.next_rtts = next;
            }
            let mut first: HashMap<PeerId, Duration> = HashMap::new();
            for p in &ids {
                if rng.below(4) != 0 {
                    first.insert(*p, Duration::from_micros(rng.below(120_000)));
                }
            }
            let mut opts = PlanOptions {
                default_rtt: ms(rng.below(150)),
                ..PlanOptions::default()
            };
            if case % 3 == 0 {
                opts.exclude.insert(ids[rng.below(20) as usize]);
            }
            let v = view(n, peers);
            let want = brute_force(&v, &first, &opts);
            match (plan_chain(&v, &first, &opts), want) {
                (Ok(chain), Some(best)) => {
                    planned += 1;
                    assert!(
                        (chain.est_secs_per_token - best).abs() < 1e-9,
                        "case {case}: planned {} vs best {best}",
                        chain.est_secs_per_token
                    );
                    let recomputed = chain_cost(&v, &chain, &first, &opts);
                    assert!(
                        (recomputed - chain.est_secs_per_token).abs() < 1e-9,
                        "case {case}"
                    );
                    for h in &chain.hops {
                        assert!(!opts.exclude.contains(&h.peer_id));
                    }
                }
                (Err(PlanError::Uncovered { missing, .. }), None) => {
                    failed += 1;
                    assert!(!missing.is_empty(), "case {case}");
                }
                (got, want) => panic!("case {case}: planner {got:?}, brute force {want:?}"),
            }
        }
        // Both outcomes were exercised.
        assert!(
            planned > 50 && failed > 10,
            "{planned} planned, {failed} failed"
        );
    }
}
