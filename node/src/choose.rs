//! `node join` with neither `--model` nor `--model-id`: which model of the
//! swarm a joining node should serve.
//!
//! The rule ([`choose_model`]), over the swarm's view (what `swarm
//! status` shows):
//!
//! - no model announced: an error that says how to seed one;
//! - one model: that one;
//! - several: the least covered. A model's **coverage** is the number of
//!   replicas of each of its blocks (online peers holding it), summed up
//!   as the *minimum* over its blocks (0 while any block has no holder:
//!   the model cannot answer at all) and then the *mean* (replica bytes
//!   per model byte: the blocks of one model are of one size, so the
//!   per-block mean is the byte-weighted one). Counting per block makes
//!   the figure relative to the model's size: a large model with one
//!   replica of every block is as covered as a small one with one
//!   replica, though it took more nodes. The model with the lowest
//!   minimum wins, then the lowest mean; a tie goes to the larger model
//!   (estimated as layers × width², the shape of its weights), which is
//!   the harder to cover, then to the smaller model id (so that every
//!   node reading the same view chooses the same).
//!
//! The view's layer counts are the announcers' (the manifest is not known
//! yet): the choice is a heuristic; what the node then serves is checked
//! against the chosen model's verified manifest as with `--model-id`.

use nakshatra_swarm::ModelView;

/// Why no model could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    /// The swarm serves no model.
    #[error(
        "no model is served in this swarm yet: seed one with `nakshatra node join --model PATH.gguf` \
         (it serves the layers that fit; others then join with `--bootstrap` alone)"
    )]
    NoModel,
}

/// The model chosen and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    /// The model id (64 hex).
    pub model_id: String,
    /// Why this one.
    pub reason: ChoiceReason,
}

/// Why [`choose_model`] chose a model (or why `node join` serves it).
#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceReason {
    /// `--model-id` gave a name (or an id prefix), and this is the model
    /// it names in the swarm's view.
    Named(String),
    /// It is the only model announced.
    Only,
    /// It is the least covered of `n_models` (see the module doc).
    LeastCovered {
        /// Models announced in the swarm.
        n_models: usize,
        /// Its fewest replicas of one block.
        min_replicas: usize,
        /// Its replicas per block on average.
        mean_replicas: f64,
    },
}

impl std::fmt::Display for ModelChoice {
    /// `<id> (chosen: ...)`, the line `node join` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reason {
            ChoiceReason::Named(name) => write!(f, "{} (named: {name})", self.model_id),
            ChoiceReason::Only => write!(
                f,
                "{} (chosen: the only model in the swarm)",
                self.model_id
            ),
            ChoiceReason::LeastCovered {
                n_models,
                min_replicas,
                mean_replicas,
            } => write!(
                f,
                "{} (chosen: least covered of {n_models} models, min {min_replicas} replicas per block, mean {mean_replicas:.2})",
                self.model_id
            ),
        }
    }
}

/// A model's coverage: fewest and mean replicas per block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coverage {
    /// The fewest holders of any one block (0: a gap).
    pub min_replicas: usize,
    /// Holders per block on average.
    pub mean_replicas: f64,
}

/// The coverage of `m` (`None` for a model with no block: nobody
/// announced a shape for it).
pub fn coverage(m: &ModelView) -> Option<Coverage> {
    let n = m.n_layers as usize;
    if n == 0 {
        return None;
    }
    let replicas = |b: usize| m.coverage.get(b).map_or(0, Vec::len);
    let min_replicas = (0..n).map(replicas).min().unwrap_or(0);
    let total: usize = (0..n).map(replicas).sum();
    Some(Coverage {
        min_replicas,
        mean_replicas: total as f64 / n as f64,
    })
}

/// The size of `m`'s weights up to a constant: layers × width² (a
/// transformer block holds about 12 width² weights). 0 when no peer
/// announced the width.
fn size_estimate(m: &ModelView) -> f64 {
    let width = m.peers.iter().map(|p| p.n_embd).max().unwrap_or(0);
    f64::from(m.n_layers) * f64::from(width) * f64::from(width)
}

/// Chooses the model the swarm needs most (see the module doc).
pub fn choose_model(models: &[ModelView]) -> Result<ModelChoice, ChooseError> {
    let known: Vec<(&ModelView, Coverage)> = models
        .iter()
        .filter_map(|m| coverage(m).map(|c| (m, c)))
        .collect();
    match known.as_slice() {
        [] => Err(ChooseError::NoModel),
        [(m, _)] => Ok(ModelChoice {
            model_id: m.id.clone(),
            reason: ChoiceReason::Only,
        }),
        _ => {
            let neediest = known
                .iter()
                .min_by(|(a, ca), (b, cb)| {
                    ca.min_replicas
                        .cmp(&cb.min_replicas)
                        .then(ca.mean_replicas.total_cmp(&cb.mean_replicas))
                        .then(size_estimate(b).total_cmp(&size_estimate(a)))
                        .then(a.id.cmp(&b.id))
                })
                .ok_or(ChooseError::NoModel)?;
            let (m, c) = neediest;
            Ok(ModelChoice {
                model_id: m.id.clone(),
                reason: ChoiceReason::LeastCovered {
                    n_models: known.len(),
                    min_replicas: c.min_replicas,
                    mean_replicas: c.mean_replicas,
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use nakshatra_swarm::{build_model_view, IdentityKeypair, PeerId, ServerInfo};

    use super::*;

    fn id(c: char) -> String {
        c.to_string().repeat(64)
    }

    /// The view of model `id` (`n_layers` blocks of width `n_embd`)
    /// served by one peer per half-open range `(start, end)`.
    fn view(id: &str, n_layers: u32, n_embd: u32, served: &[(u32, u32)]) -> ModelView {
        let infos: Vec<(PeerId, ServerInfo)> = served
            .iter()
            .map(|&(a, b)| {
                let mut i = ServerInfo::new(id, "llama", n_layers, a..b, n_embd);
                i.throughput = 10.0;
                let peer = IdentityKeypair::generate_ed25519().public().to_peer_id();
                (peer, i)
            })
            .collect();
        build_model_view(id, &infos, &HashMap::new())
    }

    #[test]
    fn no_model_is_an_error_that_says_how_to_seed() {
        assert_eq!(choose_model(&[]), Err(ChooseError::NoModel));
        // A model nobody announces a shape for does not count.
        let empty = ModelView {
            id: id('a'),
            ..ModelView::default()
        };
        assert_eq!(choose_model(&[empty]), Err(ChooseError::NoModel));
        let msg = ChooseError::NoModel.to_string();
        assert!(
            msg.contains("nakshatra node join --model PATH.gguf"),
            "{msg}"
        );
    }

    #[test]
    fn the_only_model_is_chosen_covered_or_not() {
        for served in [vec![(0, 30)], vec![(0, 10)], vec![(0, 30), (0, 30)]] {
            let c = choose_model(&[view(&id('a'), 30, 576, &served)]).unwrap();
            assert_eq!(c.model_id, id('a'));
            assert_eq!(c.reason, ChoiceReason::Only);
            assert_eq!(
                c.to_string(),
                format!("{} (chosen: the only model in the swarm)", id('a'))
            );
        }
    }

    #[test]
    fn a_model_with_a_gap_beats_any_fully_served_one() {
        // b: every block twice; a: blocks (20, 30) have no holder.
        let a = view(&id('a'), 30, 576, &[(0, 20), (0, 20), (0, 20)]);
        let b = view(&id('b'), 30, 576, &[(0, 30), (0, 30)]);
        let c = choose_model(&[b, a]).unwrap();
        assert_eq!(c.model_id, id('a'));
        assert_eq!(
            c.reason,
            ChoiceReason::LeastCovered {
                n_models: 2,
                min_replicas: 0,
                mean_replicas: 2.0,
            }
        );
        assert!(
            c.to_string()
                .contains("chosen: least covered of 2 models, min 0 replicas per block"),
            "{c}"
        );
    }

    #[test]
    fn fewest_replicas_per_block_wins_whatever_the_model_size() {
        // A large model with two replicas of every block (three nodes)
        // is better covered than a small one with one (one node):
        // coverage is counted per block, relative to the model's size.
        let big = view(&id('a'), 80, 8192, &[(0, 80), (0, 40), (40, 80)]);
        let small = view(&id('b'), 30, 576, &[(0, 30)]);
        assert_eq!(choose_model(&[big, small]).unwrap().model_id, id('b'));
    }

    #[test]
    fn equal_minimums_go_to_the_lower_mean_then_the_larger_model() {
        // Both have a block with one replica; a has more on average.
        let a = view(&id('a'), 10, 64, &[(0, 10), (0, 5)]);
        let b = view(&id('b'), 10, 64, &[(0, 10), (0, 2)]);
        assert_eq!(
            choose_model(&[a.clone(), b.clone()]).unwrap().model_id,
            id('b')
        );
        // Same coverage: the larger model (more layers × width²).
        let small = view(&id('c'), 10, 64, &[(0, 10)]);
        let large = view(&id('d'), 10, 128, &[(0, 10)]);
        assert_eq!(
            choose_model(&[small.clone(), large]).unwrap().model_id,
            id('d')
        );
        // Same everything: the smaller id, whatever the order.
        let twin = view(&id('e'), 10, 64, &[(0, 10)]);
        assert_eq!(
            choose_model(&[twin.clone(), small.clone()])
                .unwrap()
                .model_id,
            id('c')
        );
        assert_eq!(choose_model(&[small, twin]).unwrap().model_id, id('c'));
    }

    #[test]
    fn coverage_counts_holders_per_block() {
        let v = view(&id('a'), 4, 8, &[(0, 4), (0, 2)]);
        assert_eq!(
            coverage(&v),
            Some(Coverage {
                min_replicas: 1,
                mean_replicas: 1.5
            })
        );
        assert_eq!(coverage(&ModelView::default()), None);
    }
}
