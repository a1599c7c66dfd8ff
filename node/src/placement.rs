//! `--layers auto`: which blocks a joining node should serve, from the
//! swarm's view of the model and the node's memory budget.

use std::ops::Range;

use nakshatra_slicer::Manifest;

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
}

/// Chooses a range for `--layers auto`: blocks nobody serves first, then
/// the blocks with the least announced throughput; as many contiguous
/// blocks as fit in `budget` bytes.
pub fn choose_range(
    manifest: &Manifest,
    view: &nakshatra_swarm::ModelView,
    budget: u64,
) -> Result<(Range<u32>, String), PlacementError> {
    let n = manifest.n_layers;
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
    // 1. The first uncovered block, as far as the gap and the budget go.
    if let Some(first_gap) = (0..n).find(|&b| tput[b as usize] == 0.0) {
        let max = best_len(first_gap);
        if max == 0 {
            return Err(PlacementError::BlockTooBig {
                block: first_gap,
                bytes: manifest.range_bytes(first_gap, first_gap + 1),
                budget,
            });
        }
        let mut len = 0;
        while len < max && tput[(first_gap + len) as usize] == 0.0 {
            len += 1;
        }
        let r = first_gap..first_gap + len;
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
    // the windows as long as the budget allows anywhere (a short window
    // cut by the model's end would otherwise win on its shorter key).
    let lens: Vec<u32> = (0..n).map(best_len).collect();
    let full = lens.iter().copied().max().unwrap_or(0);
    let mut best: Option<(Vec<f64>, Range<u32>)> = None;
    for (start, &len) in (0..n).zip(&lens) {
        if len == 0 || len < full {
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
    best.map(|(k, r)| {
        (
            r,
            format!(
                "every block is served; this window has the least throughput (weakest block {:.1} tok/s)",
                k.first().copied().unwrap_or(0.0)
            ),
        )
    })
    .ok_or(PlacementError::NothingFits { budget })
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
        assert_eq!(choose_range(&m, &view(&[]), 30).unwrap().0, 0..3);
        // 0..2 served: the gap 2..6, cut to the budget.
        assert_eq!(choose_range(&m, &view(&[(0..2, 5.0)]), 30).unwrap().0, 2..5);
        // The gap is smaller than the budget: only the gap.
        let v = view(&[(0..2, 5.0), (4..6, 5.0)]);
        assert_eq!(choose_range(&m, &v, 60).unwrap().0, 2..4);
        // Everything served: the window with the least throughput.
        let v = view(&[(0..3, 50.0), (3..6, 5.0)]);
        assert_eq!(choose_range(&m, &v, 30).unwrap().0, 3..6);
    }

    #[test]
    fn a_budget_below_one_block_is_an_error() {
        let m = manifest();
        assert_eq!(
            choose_range(&m, &view(&[]), 5),
            Err(PlacementError::BlockTooBig {
                block: 0,
                bytes: 10,
                budget: 5
            })
        );
        assert_eq!(
            choose_range(&m, &view(&[(0..6, 1.0)]), 5),
            Err(PlacementError::NothingFits { budget: 5 })
        );
    }
}
