//! Speculative decoding's asker side (`node ask --draft MODEL.gguf`): a
//! small draft model of the same vocabulary, run on the asker, proposes
//! the next K tokens; the chain verifies them and the one after in one
//! pass (the step carries them as [`StepHeader::draft`]), and the last
//! hop streams back the accepted drafts and its own next token. A token
//! costs one pass through every hop without a draft; with one, an
//! accepted draft costs nothing more, which is what pays over slow links.
//!
//! The output is the chain's alone: the last hop samples every verified
//! position as the one-token step at that position would (same logits
//! bit for bit, see `SliceEngine::forward_as_singles`; the same per-step
//! seed), so a draft changes how many passes an answer takes, never the
//! answer. A bad draft costs passes, not correctness.
//!
//! K adapts ([`AdaptiveK`]) unless the user fixes it (`--draft-k`).
//!
//! [`StepHeader::draft`]: nakshatra_swarm::protocol::act::StepHeader::draft

use std::path::{Path, PathBuf};
use std::time::Duration;

use nakshatra_swarm::protocol::act::MAX_DRAFT;
use serde::Serialize;

use crate::engine::service::{EngineService, OwnedInput, ServiceError};
use crate::engine::tokenizer::Tokenizer;
use crate::engine::{greedy_token, EngineConfig, EngineError, SessionId, SliceEngine, StepOutput};

/// Most tokens a draft proposes in one step, adaptive or fixed (a verify
/// of 17 rows; past this the chance that all are accepted is small for
/// any draft worth running).
pub const MAX_K: usize = 16;
const _: () = assert!(MAX_K <= MAX_DRAFT);
/// The drafts an adaptive K starts with, before any acceptance is known.
pub const START_K: usize = 4;
/// Weight of the newest step in the adaptive K's running averages.
const EMA_WEIGHT: f64 = 0.3;
/// While drafting does not pay (K = 0), one step in this many still
/// drafts one token, so that a draft that starts guessing better is
/// noticed.
const PROBE_EVERY: usize = 16;

/// Why a draft model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    /// llama.cpp could not load it, or it is not a whole model.
    #[error("draft model {path}: {source}")]
    Load {
        /// The file given to `--draft`.
        path: PathBuf,
        /// What the engine refused.
        #[source]
        source: Box<EngineError>,
    },
    /// Its vocabulary is not the chain's model's.
    #[error("draft model {path} does not share the model's vocabulary: {why}")]
    Vocabulary {
        /// The file given to `--draft`.
        path: PathBuf,
        /// What differs.
        why: String,
    },
    /// The draft's engine failed mid-answer.
    #[error("draft model: {0}")]
    Engine(#[from] ServiceError),
}

/// How many tokens to draft per step (`--draft-k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DraftK {
    /// Always this many (1..=[`MAX_K`]).
    Fixed(usize),
    /// Chosen each step from the measured acceptance and costs
    /// ([`AdaptiveK`]).
    Adaptive,
}

/// A loaded draft model, shared by every ask of a process.
#[derive(Clone)]
pub struct Draft {
    engine: EngineService,
    tokenizer: std::sync::Arc<Tokenizer>,
    path: PathBuf,
    /// Drafts per step.
    pub k: DraftK,
    /// A draft that does not fit the model fails the ask (`node ask`,
    /// where the user named both), rather than being left out (the API,
    /// whose one draft may not fit every model of the swarm).
    pub required: bool,
}

impl std::fmt::Debug for Draft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Draft")
            .field("path", &self.path)
            .field("k", &self.k)
            .finish()
    }
}

impl Draft {
    /// Loads the draft model (a whole model: it turns tokens into logits
    /// alone) behind its own engine service.
    pub fn load(path: &Path, k: DraftK, cfg: &EngineConfig) -> Result<Self, DraftError> {
        let load_err = |source| DraftError::Load {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let engine = SliceEngine::load(path, None, cfg).map_err(load_err)?;
        let l = engine.layout();
        if !(l.is_first() && l.is_last()) {
            return Err(load_err(EngineError::BadInput(format!(
                "it is a slice (layers {}..{} of {}), not a whole model",
                l.start, l.end, l.n_layers_total
            ))));
        }
        let tokenizer = Tokenizer::load(path).map_err(load_err)?;
        Ok(Self {
            engine: EngineService::new(engine),
            tokenizer: std::sync::Arc::new(tokenizer),
            path: path.to_path_buf(),
            k,
            required: true,
        })
    }

    /// The same draft, left out of asks whose model it does not fit.
    pub fn optional(mut self) -> Self {
        self.required = false;
        self
    }

    /// Checks that the draft speaks the model's vocabulary: the same size,
    /// and the same token ids and pieces for this prompt.
    pub fn check_vocabulary(&self, model: &Tokenizer, prompt: &[i32]) -> Result<(), DraftError> {
        let bad = |why: String| DraftError::Vocabulary {
            path: self.path.clone(),
            why,
        };
        if self.tokenizer.n_vocab() != model.n_vocab() {
            return Err(bad(format!(
                "{} tokens, the model has {}",
                self.tokenizer.n_vocab(),
                model.n_vocab()
            )));
        }
        if let Some(t) = prompt
            .iter()
            .find(|&&t| self.tokenizer.piece(t) != model.piece(t))
        {
            return Err(bad(format!("token {t} is another piece")));
        }
        Ok(())
    }

    /// A drafting session for one chain run (closed when dropped).
    pub async fn session(&self) -> Result<Drafter, DraftError> {
        let id = self.engine.open().await?;
        Ok(Drafter {
            engine: self.engine.clone(),
            id,
            fed: Vec::new(),
            limit: self.engine.ctx_per_session() as usize,
        })
    }
}

/// One run's draft session: the draft model's KV cache of the tokens so
/// far.
pub struct Drafter {
    engine: EngineService,
    id: SessionId,
    /// The tokens the draft's KV cache holds, in order.
    fed: Vec<i32>,
    /// Most tokens the draft's session may hold.
    limit: usize,
}

impl Drop for Drafter {
    fn drop(&mut self) {
        let (engine, id) = (self.engine.clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = engine.close(id).await;
            });
        }
    }
}

impl Drafter {
    /// Up to `k` tokens the draft model expects after `context` (the
    /// prompt and every token so far), greedily. Fewer when the draft's
    /// context runs out.
    pub async fn propose(&mut self, context: &[i32], k: usize) -> Result<Vec<i32>, DraftError> {
        let room = self.limit.saturating_sub(context.len());
        let k = k.min(room);
        if k == 0 || context.is_empty() {
            return Ok(Vec::new());
        }
        // Keep what the cache shares with the context; feed the rest.
        let mut common = self
            .fed
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count();
        // At least the last token is fed, for its logits.
        common = common.min(context.len() - 1);
        if common < self.fed.len() {
            self.engine.truncate(self.id, common as u32).await?;
            self.fed.truncate(common);
        }
        let mut input = context[common..].to_vec();
        let mut out = Vec::with_capacity(k);
        loop {
            let logits = match self
                .engine
                .forward(self.id, OwnedInput::Tokens(input.clone()))
                .await?
            {
                StepOutput::Logits(l) => l,
                StepOutput::Hidden(_) => {
                    return Err(ServiceError::Engine(EngineError::BadInput(
                        "the draft model returned hidden states".into(),
                    ))
                    .into())
                }
            };
            self.fed.extend_from_slice(&input);
            let t = greedy_token(&logits).ok_or(ServiceError::Engine(EngineError::Sampling))?;
            out.push(t);
            if out.len() == k {
                return Ok(out);
            }
            input = vec![t];
        }
    }
}

/// What speculative decoding did in one ask (`timings.speculative` in
/// `node ask --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SpecReport {
    /// `"auto"` or the fixed K.
    pub k: String,
    /// Verify steps (decode steps that carried drafts).
    pub steps: usize,
    /// Tokens drafted.
    pub drafted: usize,
    /// Drafted tokens the chain accepted.
    pub accepted: usize,
    /// `accepted / drafted`.
    pub acceptance: f64,
    /// Tokens per decode step (1 without drafts).
    pub tokens_per_step: f64,
    /// Mean drafts per verify step.
    pub mean_k: f64,
}

/// Chooses K each step to maximise tokens per second.
///
/// With a per-token acceptance rate `a` (each draft is accepted with
/// probability `a` if the ones before it were), a step of K drafts yields
/// `E(K) = (1 − a^(K+1)) / (1 − a)` tokens (Leviathan et al., 2023) and
/// takes `T(K) = step + K × draft`: the chain's pass (the links and every
/// hop's compute, nearly flat in K when links dominate) plus K draft
/// tokens on the asker. K maximises `E(K) / T(K)`; `a`, `step` and `draft`
/// are running averages of what was measured. K = 0 (a plain step) when
/// no K pays, with a one-draft probe every [`PROBE_EVERY`] steps.
#[derive(Debug, Clone)]
pub struct AdaptiveK {
    mode: DraftK,
    /// Per-token acceptance, running average (starts optimistic, so
    /// drafting is tried).
    a: f64,
    /// A verify pass through the chain, seconds.
    step_s: Option<f64>,
    /// One draft token on the asker, seconds.
    draft_s: Option<f64>,
    report: SpecReport,
    decode_steps: usize,
    decode_tokens: usize,
    /// Plain steps in a row since the last drafted one.
    undrafted: usize,
}

impl AdaptiveK {
    /// A chooser in `mode`.
    pub fn new(mode: DraftK) -> Self {
        let k = match mode {
            DraftK::Fixed(k) => k.to_string(),
            DraftK::Adaptive => "auto".to_string(),
        };
        Self {
            mode,
            a: 0.7,
            step_s: None,
            draft_s: None,
            report: SpecReport {
                k,
                ..SpecReport::default()
            },
            decode_steps: 0,
            decode_tokens: 0,
            undrafted: 0,
        }
    }

    /// Drafts for the next step.
    pub fn k(&self) -> usize {
        match self.mode {
            DraftK::Fixed(k) => k.clamp(1, MAX_K),
            DraftK::Adaptive => {
                let (Some(step), Some(draft)) = (self.step_s, self.draft_s) else {
                    return START_K;
                };
                let a = self.a.clamp(0.0, 0.99);
                let rate = |k: usize| {
                    let e = (1.0 - a.powi(k as i32 + 1)) / (1.0 - a);
                    e / (step + k as f64 * draft).max(1e-9)
                };
                let best = (0..=MAX_K)
                    .max_by(|&x, &y| rate(x).total_cmp(&rate(y)))
                    .unwrap_or(0);
                if best == 0 && self.undrafted + 1 >= PROBE_EVERY {
                    1
                } else {
                    best
                }
            }
        }
    }

    /// Records a decode step: `drafted` tokens proposed (taking `draft`
    /// on the asker), `accepted` of them kept, the chain's pass taking
    /// `pass`.
    pub fn record(&mut self, drafted: usize, accepted: usize, draft: Duration, pass: Duration) {
        self.decode_steps += 1;
        self.decode_tokens += accepted + 1;
        if drafted == 0 {
            self.undrafted += 1;
            return;
        }
        self.undrafted = 0;
        let r = &mut self.report;
        r.steps += 1;
        r.drafted += drafted;
        r.accepted += accepted;
        // Per-token acceptance from this step: accepted of the drafts
        // tried (the one rejected counts; those after it were not tried).
        let tried = (accepted + 1).min(drafted);
        let a = accepted as f64 / tried as f64;
        let ema = |old: Option<f64>, new: f64| match old {
            Some(o) => o + EMA_WEIGHT * (new - o),
            None => new,
        };
        self.a = ema(Some(self.a), a);
        self.step_s = Some(ema(self.step_s, pass.as_secs_f64()));
        self.draft_s = Some(ema(self.draft_s, draft.as_secs_f64() / drafted as f64));
    }

    /// What was done, for the ask's timings.
    pub fn report(&self) -> SpecReport {
        let mut r = self.report.clone();
        r.acceptance = r.accepted as f64 / (r.drafted.max(1)) as f64;
        r.tokens_per_step = self.decode_tokens as f64 / (self.decode_steps.max(1)) as f64;
        r.mean_k = r.drafted as f64 / (r.steps.max(1)) as f64;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_k_follows_acceptance_and_link_cost() {
        let ms = Duration::from_millis;
        // Slow links, cheap drafts, everything accepted: K grows.
        let mut k = AdaptiveK::new(DraftK::Adaptive);
        assert_eq!(k.k(), START_K);
        for _ in 0..20 {
            let n = k.k();
            k.record(n, n, ms(n as u64), ms(80));
        }
        assert!(k.k() >= 12, "{}", k.k());
        // Nothing accepted: no drafts, but for a one-draft probe now and
        // then.
        let mut ks = Vec::new();
        for _ in 0..64 {
            let n = k.k();
            ks.push(n);
            k.record(n, 0, ms(n as u64), ms(80));
        }
        let tail = &ks[32..];
        assert_eq!(tail.iter().filter(|&&n| n == 0).count(), 30, "{ks:?}");
        assert_eq!(tail.iter().filter(|&&n| n == 1).count(), 2, "{ks:?}");
        // Fast links and drafts as dear as a pass: few drafts even at a
        // fair acceptance.
        // Each draft accepted with probability 0.6 (a fixed LCG).
        let mut rng = 12345u64;
        let mut accept = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            (rng >> 33) % 10 < 6
        };
        let mut k = AdaptiveK::new(DraftK::Adaptive);
        for _ in 0..200 {
            let n = k.k();
            let accepted = (0..n).take_while(|_| accept()).count();
            k.record(n, accepted, ms(5 * n as u64), ms(5));
        }
        assert!(k.k() <= 1, "{}", k.k());
        let r = k.report();
        assert_eq!(r.k, "auto");
        assert!(r.acceptance > 0.4 && r.acceptance < 0.8, "{r:?}");
        // The same drafts over slow links: more of them pay.
        let mut k = AdaptiveK::new(DraftK::Adaptive);
        for _ in 0..200 {
            let n = k.k();
            let accepted = (0..n).take_while(|_| accept()).count();
            k.record(n, accepted, ms(n as u64), ms(100));
        }
        assert!((3..=8).contains(&k.k()), "{}", k.k());
        // A fixed K stays.
        let mut k = AdaptiveK::new(DraftK::Fixed(8));
        k.record(8, 0, ms(8), ms(80));
        assert_eq!(k.k(), 8);
        assert_eq!(k.report().tokens_per_step, 1.0);
    }
}
