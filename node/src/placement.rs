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
    let n = manifest.n_layers;
    let allowed = |start: u32, end: u32| rules.is_none_or(|r| r.check(start, end).is_ok());
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
    // 1. The first uncovered block, as far as the gap and the budget go
    // (shorter, or on past the gap, where the family refuses that length).
    if let Some(first_gap) = (0..n).find(|&b| tput[b as usize] == 0.0) {
        let max = best_len(first_gap);
        if max == 0 {
            return Err(PlacementError::BlockTooBig {
                block: first_gap,
                bytes: manifest.range_bytes(first_gap, first_gap + 1),
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
}
