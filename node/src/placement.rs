//! `--layers auto`: which blocks a joining node should serve, from the
//! swarm's view of the model and the node's memory budget.

use std::ops::Range;

use nakshatra_slicer::{Manifest, RangeRules};

/// Why no range fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The first block nobody serves is bigger than the budget.
    #[error("block {block} alone needs {bytes} bytes, over the memory budget of {budget}")]
    BlockTooBig {
        /// The block.
        block: u32,
        /// Its weights, bytes.
        bytes: u64,
        /// The budget, bytes.
        budget: u64,
    },
    /// Every block is served, and none fits in the budget.
    #[error("not even one block fits in the memory budget of {budget} bytes")]
    NothingFits {
        /// The budget, bytes.
        budget: u64,
    },
    /// Ranges fit in the budget, but the model's family can serve none of
    /// them exactly (see `nakshatra model inspect` and the slicer's rules).
    #[error(
        "no range that fits in the memory budget of {budget} bytes can be served exactly by this model's family; give --layers or more memory"
    )]
    NoExactRange {
        /// The budget, bytes.
        budget: u64,
    },
}

/// Chooses a range for `--layers auto`: blocks nobody serves first, then
/// the blocks with the least announced throughput; as many contiguous
/// blocks as fit in `budget` bytes, among the ranges the model's family
/// can serve exactly (`rules`: a DeepSeek-2 slice must not be 26 or 27
/// layers long, a gpt-oss one must hold a sliding-window layer, ...).
pub fn choose_range(
    manifest: &Manifest,
    view: &nakshatra_swarm::ModelView,
    budget: u64,
    rules: Option<&RangeRules>,
) -> Result<(Range<u32>, String), PlacementError> {
    let tput = block_throughput(manifest.n_layers, &view.peers, None);
    choose_range_by(
        manifest.n_layers,
        |a, b| manifest.range_bytes(a, b),
        &tput,
        budget,
        rules,
    )
}

/// Announced throughput per block of an `n`-block model: the sum over
/// online holders (0 for a block nobody holds). `except`: a peer left
/// out (a node weighing its own move).
pub fn block_throughput(
    n: u32,
    peers: &[nakshatra_swarm::PeerView],
    except: Option<&nakshatra_swarm::PeerId>,
) -> Vec<f64> {
    let mut tput = vec![0f64; n as usize];
    for p in peers {
        // Joining peers count (they will serve soon; Petals counts them
        // too, so that two joiners do not pick the same blocks).
        if Some(&p.peer_id) == except || p.state == nakshatra_swarm::ServerState::Offline {
            continue;
        }
        for b in p.range[0]..p.range[1].min(n) {
            tput[b as usize] += p.throughput.max(0.0);
        }
    }
    tput
}

/// [`choose_range`] on any model: `range_bytes(start, end)` gives the
/// bytes of a slice, `tput` the throughput per block
/// ([`block_throughput`]). What the swarm simulator places with.
pub fn choose_range_by(
    n: u32,
    range_bytes: impl Fn(u32, u32) -> u64,
    tput: &[f64],
    budget: u64,
    rules: Option<&RangeRules>,
) -> Result<(Range<u32>, String), PlacementError> {
    let allowed = |start: u32, end: u32| rules.is_none_or(|r| r.check(start, end).is_ok());
    let fits = |start: u32, len: u32| range_bytes(start, start + len) <= budget;
    let best_len = |start: u32| -> u32 {
        let mut len = 0;
        while start + len < n && fits(start, len + 1) {
            len += 1;
        }
        len
    };
    // 1. The first uncovered block, as far as the gap and the budget go
    // (shorter, or on past the gap, where the family refuses that length).
    if let Some(first_gap) = (0..n).find(|&b| tput[b as usize] == 0.0) {
        let max = best_len(first_gap);
        if max == 0 {
            return Err(PlacementError::BlockTooBig {
                block: first_gap,
                bytes: range_bytes(first_gap, first_gap + 1),
                budget,
            });
        }
        let mut gap = 0;
        while gap < max && tput[(first_gap + gap) as usize] == 0.0 {
            gap += 1;
        }
        let from_gap = (1..=gap)
            .rev()
            .chain(gap + 1..=max)
            .find(|&len| allowed(first_gap, first_gap + len))
            .map(|len| first_gap..first_gap + len);
        // Else the smallest range holding the gap's first block that the
        // family allows (the most uncovered blocks, then the fewest
        // covered ones it must repeat).
        let r = match from_gap {
            Some(r) => r,
            None => (0..=first_gap)
                .flat_map(|s| (first_gap + 1..=n).map(move |e| s..e))
                .filter(|r| fits(r.start, r.end - r.start) && allowed(r.start, r.end))
                .max_by_key(|r| {
                    let open = r.clone().filter(|&b| tput[b as usize] == 0.0).count();
                    (open, std::cmp::Reverse(r.end - r.start), r.start)
                })
                .ok_or(PlacementError::NoExactRange { budget })?,
        };
        let len = r.end - r.start;
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
    // (compared as sorted per-block throughputs, as Petals does), among
    // the longest windows the budget and the family allow anywhere (a
    // short window cut by the model's end would otherwise win on its
    // shorter key).
    let lens: Vec<u32> = (0..n).map(best_len).collect();
    let full = lens.iter().copied().max().unwrap_or(0);
    for len in (1..=full).rev() {
        let mut best: Option<(Vec<f64>, Range<u32>)> = None;
        for (start, &room) in (0..n).zip(&lens) {
            if room < len || !allowed(start, start + len) {
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
        if let Some((k, r)) = best {
            return Ok((
                r,
                format!(
                    "every block is served; this window has the least throughput (weakest block {:.1} tok/s)",
                    k.first().copied().unwrap_or(0.0)
                ),
            ));
        }
    }
    Err(if full == 0 {
        PlacementError::NothingFits { budget }
    } else {
        PlacementError::NoExactRange { budget }
    })
}

/// How long `--layers auto` keeps reading the model's view while it shows
/// no server although peers are known to serve the model (they served the
/// manifest): a joining node's first view sync can come back empty while
/// its connections still identify. A few view syncs.
pub const VIEW_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// How often it reads the view meanwhile (each read is a view sync with
/// the connected peers).
pub const VIEW_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// The view `--layers auto` places a joining node from.
///
/// When `served` (peers are known to serve the model: they answered for
/// its manifest, or hold its provider record), a view with no server is
/// the swarm not having answered yet, not a model nobody serves: placing
/// from it would put the node on the first blocks, and every node joining
/// in such a moment on the same ones. So the view is read again every
/// `poll` until it shows a server or `wait` has passed; after that the
/// last view is used as it is (a warning says so). A model nobody is known
/// to serve (`served` false: a seeder with the file) is placed from the
/// first view.
pub async fn view_for_placement(
    swarm: &nakshatra_swarm::Client,
    model_id: &str,
    shape: &nakshatra_swarm::ModelShape,
    served: bool,
    wait: std::time::Duration,
    poll: std::time::Duration,
) -> Result<nakshatra_swarm::ModelView, nakshatra_swarm::LookupError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut reads = 0u32;
    loop {
        let view = swarm.model_view_with(model_id, shape).await?;
        reads += 1;
        if !served || !view.peers.is_empty() {
            if reads > 1 {
                tracing::info!(reads, "the model's servers appeared in the view");
            }
            return Ok(view);
        }
        if tokio::time::Instant::now() + poll > deadline {
            tracing::warn!(
                reads,
                "peers serve this model but the view shows none of them: placing from an empty view"
            );
            return Ok(view);
        }
        tokio::time::sleep(poll).await;
    }
}

/// Petals' balance threshold: a node moves when the swarm's weakest block
/// would be this much faster or more with it elsewhere (the current
/// minimum below 0.75 of the one after the move).
pub const BALANCE_QUALITY: f64 = 0.75;

/// Positive checks in a row before a node moves: a move reloads weights
/// (fetch and load), so one view's passing dip must not cause it (Petals
/// issue #389: servers flapping between spans).
pub const REBALANCE_CONFIRMATIONS: u32 = 3;

/// Least time a node keeps a range before it may move again (after
/// joining or after a move): lets the swarm's announcements settle on the
/// new layout before anyone judges it.
pub const MIN_DWELL: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// What one rebalancing check concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum Rebalance {
    /// Stay: the swarm is balanced enough, or the move is not confirmed
    /// yet (`positives` checks in a row so far).
    Stay {
        /// Consecutive positive checks so far (0 when this one was not).
        positives: u32,
    },
    /// Move to `to`: confirmed [`REBALANCE_CONFIRMATIONS`] times and the
    /// node has dwelt [`MIN_DWELL`].
    Move {
        /// The new range.
        to: Range<u32>,
        /// The weakest block's throughput now.
        min_now: f64,
        /// The weakest block's throughput after the move.
        min_after: f64,
    },
}

/// One serving node's rebalancing state: Petals' rule (move when the
/// weakest block's throughput is below [`BALANCE_QUALITY`] of what it
/// would be with this node elsewhere, never uncovering a block), with
/// hysteresis: [`REBALANCE_CONFIRMATIONS`] positive checks in a row and a
/// [`MIN_DWELL`] between moves. Pure: the caller gives the view and the
/// clock, and performs the move.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    positives: u32,
    since: std::time::Instant,
    confirmations: u32,
    dwell: std::time::Duration,
}

impl Rebalancer {
    /// A node that took its range at `now`, with the default hysteresis.
    pub fn new(now: std::time::Instant) -> Self {
        Self::with(now, REBALANCE_CONFIRMATIONS, MIN_DWELL)
    }

    /// With other hysteresis knobs (the simulator scales the dwell with
    /// its clock).
    pub fn with(now: std::time::Instant, confirmations: u32, dwell: std::time::Duration) -> Self {
        Rebalancer {
            positives: 0,
            since: now,
            confirmations: confirmations.max(1),
            dwell,
        }
    }

    /// One check. `me`: this node's peer id and `current` range; `tput`:
    /// throughput per block with this node in it ([`block_throughput`] of
    /// a fresh view: at most one record TTL old); `own`: this node's
    /// throughput. A [`Rebalance::Move`] restarts the dwell.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &mut self,
        now: std::time::Instant,
        current: Range<u32>,
        own: f64,
        tput: &[f64],
        range_bytes: impl Fn(u32, u32) -> u64,
        budget: u64,
        rules: Option<&RangeRules>,
    ) -> Rebalance {
        let n = tput.len() as u32;
        let min_of = |t: &[f64]| t.iter().copied().fold(f64::INFINITY, f64::min);
        let min_now = min_of(tput);
        // The swarm without this node; a small bias keeps it where it is
        // when two places are as good (Petals' 1 + 1e-3).
        let mut without = tput.to_vec();
        for b in current.clone().filter(|&b| b < n) {
            without[b as usize] = (without[b as usize] - own * (1.0 + 1e-3)).max(0.0);
        }
        let positive = match choose_range_by(n, &range_bytes, &without, budget, rules) {
            Ok((to, _)) if to != current => {
                let mut after = without.clone();
                for b in to.clone() {
                    after[b as usize] += own;
                }
                let min_after = min_of(&after);
                // Never uncover a block (a move that leaves one at zero
                // gives min_after 0 and fails here).
                (min_after > 0.0 && min_now < BALANCE_QUALITY * min_after)
                    .then_some((to, min_after))
            }
            _ => None,
        };
        let Some((to, min_after)) = positive else {
            self.positives = 0;
            return Rebalance::Stay { positives: 0 };
        };
        self.positives += 1;
        if self.positives < self.confirmations || now.duration_since(self.since) < self.dwell {
            return Rebalance::Stay {
                positives: self.positives,
            };
        }
        self.positives = 0;
        self.since = now;
        Rebalance::Move {
            to,
            min_now,
            min_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use nakshatra_slicer::{Piece, PieceId};
    use nakshatra_swarm::{build_model_view, IdentityKeypair, PeerId, ServerInfo};

    use super::*;

    const MODEL: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// Six blocks of 10 bytes each; embeddings, globals and head empty.
    fn manifest() -> Manifest {
        let piece = |id, n_bytes| Piece {
            id,
            hash: String::new(),
            n_bytes,
            tensors: Vec::new(),
        };
        let mut pieces = vec![piece(PieceId::Embd, 0)];
        pieces.extend((0..6).map(|b| piece(PieceId::Block(b), 10)));
        pieces.push(piece(PieceId::Globals, 0));
        pieces.push(piece(PieceId::Head, 0));
        Manifest {
            model_id: MODEL.into(),
            arch: "llama".into(),
            n_layers: 6,
            n_embd: 8,
            n_vocab: 10,
            tied_embeddings: false,
            pieces,
            vocab_hash: String::new(),
            vocab_bytes: 0,
        }
    }

    fn view(served: &[(Range<u32>, f64)]) -> nakshatra_swarm::ModelView {
        let infos: Vec<(PeerId, ServerInfo)> = served
            .iter()
            .map(|(r, tput)| {
                let mut i = ServerInfo::new(MODEL, "llama", 6, r.clone(), 8);
                i.throughput = *tput;
                let peer = IdentityKeypair::generate_ed25519().public().to_peer_id();
                (peer, i)
            })
            .collect();
        build_model_view(MODEL, &infos, &HashMap::new())
    }

    #[test]
    fn gaps_first_then_the_weakest_window() {
        let m = manifest();
        // Nothing served: from block 0, as far as 30 bytes go.
        assert_eq!(choose_range(&m, &view(&[]), 30, None).unwrap().0, 0..3);
        // 0..2 served: the gap 2..6, cut to the budget.
        assert_eq!(
            choose_range(&m, &view(&[(0..2, 5.0)]), 30, None).unwrap().0,
            2..5
        );
        // The gap is smaller than the budget: only the gap.
        let v = view(&[(0..2, 5.0), (4..6, 5.0)]);
        assert_eq!(choose_range(&m, &v, 60, None).unwrap().0, 2..4);
        // Everything served: the window with the least throughput.
        let v = view(&[(0..3, 50.0), (3..6, 5.0)]);
        assert_eq!(choose_range(&m, &v, 30, None).unwrap().0, 3..6);
    }

    #[test]
    fn a_budget_below_one_block_is_an_error() {
        let m = manifest();
        assert_eq!(
            choose_range(&m, &view(&[]), 5, None),
            Err(PlacementError::BlockTooBig {
                block: 0,
                bytes: 10,
                budget: 5
            })
        );
        assert_eq!(
            choose_range(&m, &view(&[(0..6, 1.0)]), 5, None),
            Err(PlacementError::NothingFits { budget: 5 })
        );
    }

    /// The family's rules steer the choice: gpt-oss slides on even layers
    /// and cannot load a slice without one, so the lone global layer 5 is
    /// taken with layer 4, and a window of one odd layer is never chosen.
    #[test]
    fn ranges_the_family_refuses_are_passed_over() {
        use nakshatra_slicer::{MetaValue, RangeRules};
        let md = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("gpt-oss".into()),
            ),
            ("gpt-oss.block_count".to_string(), MetaValue::U32(6)),
        ];
        let rules = RangeRules::new(&md, 6).unwrap();
        let m = manifest();
        let v = view(&[(0..5, 5.0)]);
        assert_eq!(choose_range(&m, &v, 30, None).unwrap().0, 5..6);
        assert_eq!(choose_range(&m, &v, 30, Some(&rules)).unwrap().0, 4..6);
        // All served, room for one block: only even (sliding) layers.
        let v = view(&[(0..6, 5.0)]);
        let (r, _) = choose_range(&m, &v, 10, Some(&rules)).unwrap();
        assert!(r.len() == 1 && r.start % 2 == 0, "{r:?}");
        // Nothing allowed fits: a clear error.
        let lone = view(&[(0..5, 5.0)]);
        assert_eq!(
            choose_range(&m, &lone, 10, Some(&rules)),
            Err(PlacementError::NoExactRange { budget: 10 })
        );
    }

    /// Throughput per block of a 20-block model served by `ranges`, each
    /// at `t` tokens/s.
    fn tput(ranges: &[(Range<u32>, f64)]) -> Vec<f64> {
        let mut v = vec![0.0; 20];
        for (r, t) in ranges {
            for b in r.clone() {
                v[b as usize] += t;
            }
        }
        v
    }

    fn blocks(a: u32, b: u32) -> u64 {
        u64::from(b - a)
    }

    #[test]
    fn a_node_moves_to_a_gap_after_three_checks_and_its_dwell() {
        let t0 = std::time::Instant::now();
        let dwell = std::time::Duration::from_secs(60);
        let mut r = Rebalancer::with(t0, 3, dwell);
        // Two nodes on 0..10, nobody on 10..20: one of them should move.
        let t = tput(&[(0..10, 5.0), (0..10, 5.0)]);
        let check = |r: &mut Rebalancer, at| r.check(at, 0..10, 5.0, &t, blocks, 10, None);
        assert_eq!(check(&mut r, t0), Rebalance::Stay { positives: 1 });
        assert_eq!(check(&mut r, t0), Rebalance::Stay { positives: 2 });
        // Confirmed, but the dwell is not over.
        assert_eq!(check(&mut r, t0), Rebalance::Stay { positives: 3 });
        match check(&mut r, t0 + dwell) {
            Rebalance::Move {
                to,
                min_now,
                min_after,
            } => {
                assert_eq!(to, 10..20);
                assert_eq!(min_now, 0.0);
                // Its own span counts 1e-3 less (the stay-put bias).
                assert!((min_after - 4.995).abs() < 1e-9, "{min_after}");
            }
            other => panic!("expected a move, got {other:?}"),
        }
        // A fresh dwell starts with the move.
        assert_eq!(check(&mut r, t0 + dwell), Rebalance::Stay { positives: 1 });
    }

    #[test]
    fn balanced_swarms_and_sole_holders_stay() {
        let t0 = std::time::Instant::now();
        let mut r = Rebalancer::with(t0, 1, std::time::Duration::ZERO);
        let balanced = tput(&[(0..10, 5.0), (10..20, 5.0), (0..10, 5.0), (10..20, 5.0)]);
        assert_eq!(
            r.check(t0, 0..10, 5.0, &balanced, blocks, 10, None),
            Rebalance::Stay { positives: 0 }
        );
        // The only holder of 0..10 would uncover it by moving to the
        // weaker 10..20: it stays.
        let lopsided = tput(&[(0..10, 5.0), (10..20, 1.0)]);
        assert_eq!(
            r.check(t0, 0..10, 5.0, &lopsided, blocks, 10, None),
            Rebalance::Stay { positives: 0 }
        );
        // A dip then a recovery resets the count (hysteresis).
        let mut r = Rebalancer::with(t0, 3, std::time::Duration::ZERO);
        let gap = tput(&[(0..10, 5.0), (0..10, 5.0)]);
        assert_eq!(
            r.check(t0, 0..10, 5.0, &gap, blocks, 10, None),
            Rebalance::Stay { positives: 1 }
        );
        assert_eq!(
            r.check(t0, 0..10, 5.0, &balanced, blocks, 10, None),
            Rebalance::Stay { positives: 0 }
        );
    }
}
