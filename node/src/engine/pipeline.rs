//! A chain of ranges run one after another in one process, and the
//! generation loop on top of it. This is the reference the network path is
//! compared with, and what `nakshatra run` uses.

use std::time::{Duration, Instant};

use super::{EngineError, Sampler, SamplerSpec, SessionId, SliceEngine, StepInput, StepOutput};

/// Ranges that together cover a whole model, in order.
#[derive(Debug)]
pub struct LocalChain {
    stages: Vec<SliceEngine>,
}

/// One session on every stage of a [`LocalChain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSession(Vec<SessionId>);

impl LocalChain {
    /// Checks that the stages are contiguous and cover the whole model.
    pub fn new(stages: Vec<SliceEngine>) -> Result<Self, EngineError> {
        let bad = |m: String| EngineError::BadInput(m);
        let first = stages.first().ok_or_else(|| bad("empty chain".into()))?;
        let total = first.layout().n_layers_total;
        let n_embd = first.layout().n_embd;
        let mut next = 0;
        for s in &stages {
            let l = s.layout();
            if l.start != next || l.n_layers_total != total || l.n_embd != n_embd {
                return Err(bad(format!(
                    "stage {}..{} of {} does not follow layer {next} of {total}",
                    l.start, l.end, l.n_layers_total
                )));
            }
            next = l.end;
        }
        if next != total {
            return Err(bad(format!("chain ends at layer {next} of {total}")));
        }
        Ok(Self { stages })
    }

    /// The loaded ranges in layer order: the first takes tokens, the last
    /// returns logits.
    pub fn stages(&self) -> &[SliceEngine] {
        &self.stages
    }

    /// Tokens a session holds (the smallest over the stages).
    pub fn ctx_per_session(&self) -> u32 {
        self.stages
            .iter()
            .map(SliceEngine::ctx_per_session)
            .min()
            .unwrap_or(0)
    }

    /// Sets every stage's thread count.
    pub fn set_threads(&mut self, n: u32) {
        self.set_thread_counts(n, n);
    }

    /// Sets every stage's thread counts (see
    /// [`SliceEngine::set_thread_counts`]).
    pub fn set_thread_counts(&mut self, single: u32, batch: u32) {
        for s in &mut self.stages {
            s.set_thread_counts(single, batch);
        }
    }

    /// Opens a session on every stage (none left open on failure).
    pub fn open(&mut self) -> Result<ChainSession, EngineError> {
        let mut ids = Vec::with_capacity(self.stages.len());
        for i in 0..self.stages.len() {
            match self.stages[i].open_session() {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for (s, id) in self.stages.iter_mut().zip(&ids) {
                        let _ = s.close_session(*id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ChainSession(ids))
    }

    /// Runs one step (tokens in, logits of the last position out). On error
    /// every stage is rolled back to where the session was.
    pub fn step(&mut self, s: &ChainSession, tokens: &[i32]) -> Result<Vec<f32>, EngineError> {
        self.step_rows(s, tokens, 1)
    }

    /// [`LocalChain::step`] returning the logits of the last `rows`
    /// positions, row after row, each as a one-token step would give it
    /// (a speculative verify: see [`SliceEngine::forward_as_singles`]).
    pub fn step_rows(
        &mut self,
        s: &ChainSession,
        tokens: &[i32],
        rows: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let pos0 = self.position(s)?;
        let r = self.step_inner(s, tokens, rows);
        if r.is_err() {
            for (st, id) in self.stages.iter_mut().zip(&s.0) {
                if st.position(*id).is_ok_and(|p| p > pos0) {
                    let _ = st.truncate(*id, pos0);
                }
            }
        }
        r
    }

    fn step_inner(
        &mut self,
        s: &ChainSession,
        tokens: &[i32],
        rows: usize,
    ) -> Result<Vec<f32>, EngineError> {
        let mut hidden: Vec<f32> = Vec::new();
        let n = self.stages.len();
        for (i, (st, id)) in self.stages.iter_mut().zip(&s.0).enumerate() {
            let input = if i == 0 {
                StepInput::Tokens(tokens)
            } else {
                StepInput::Hidden(&hidden)
            };
            let out = if rows > 1 {
                st.forward_as_singles(*id, input, rows)?
            } else {
                st.forward(*id, input)?
            };
            match out {
                StepOutput::Hidden(h) if i + 1 < n => hidden = h,
                StepOutput::Logits(l) if i + 1 == n => return Ok(l),
                _ => {
                    return Err(EngineError::BadInput(
                        "stage returned the wrong kind".into(),
                    ))
                }
            }
        }
        Err(EngineError::BadInput("empty chain".into()))
    }

    /// Tokens the session holds so far (as its first stage counts them).
    pub fn position(&self, s: &ChainSession) -> Result<u32, EngineError> {
        let first = self
            .stages
            .first()
            .zip(s.0.first())
            .ok_or_else(|| EngineError::BadInput("empty chain".into()))?;
        first.0.position(*first.1)
    }

    /// Drops positions `pos..` on every stage.
    pub fn truncate(&mut self, s: &ChainSession, pos: u32) -> Result<(), EngineError> {
        for (st, id) in self.stages.iter_mut().zip(&s.0) {
            st.truncate(*id, pos)?;
        }
        Ok(())
    }

    /// Closes the session on every stage, freeing its slots; a stage that
    /// no longer knows it is skipped.
    pub fn close(&mut self, s: ChainSession) {
        for (st, id) in self.stages.iter_mut().zip(&s.0) {
            let _ = st.close_session(*id);
        }
    }
}

/// Limits and sampling of one [`generate`] call.
#[derive(Debug, Clone, Copy)]
pub struct GenerateParams {
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// How each token is picked from the last range's logits.
    pub sampler: SamplerSpec,
    /// Keep every step's logits (for comparisons).
    pub keep_logits: bool,
}

/// What [`generate`] produced, with its timings.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// Generated tokens (the end-of-generation token excluded).
    pub tokens: Vec<i32>,
    /// Logits of every step when asked for (step 0 is the prefill).
    pub logits: Vec<Vec<f32>>,
    /// Tokens in the prompt (the prefill step's length).
    pub n_prompt: usize,
    /// Time of the prefill step.
    pub prefill: Duration,
    /// Time of the decode steps.
    pub decode: Duration,
    /// Decode steps run after the prefill; each sampled one more token.
    pub n_decode: usize,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.n_prompt as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    /// Generated tokens per second over the decode steps.
    pub fn decode_tps(&self) -> f64 {
        self.n_decode as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Prefills `prompt`, then decodes one token per step until `max_tokens`
/// or an end-of-generation token. `on_token` sees each token as it comes.
pub fn generate(
    chain: &mut LocalChain,
    session: &ChainSession,
    prompt: &[i32],
    params: &GenerateParams,
    is_eog: impl Fn(i32) -> bool,
    mut on_token: impl FnMut(i32),
) -> Result<Generation, EngineError> {
    let limit = chain.ctx_per_session();
    let have = chain.position(session)?;
    let needed = have as usize + prompt.len();
    if needed > limit as usize {
        return Err(EngineError::ContextFull {
            have,
            adding: u32::try_from(prompt.len()).unwrap_or(u32::MAX),
            limit,
        });
    }
    let mut sampler = Sampler::new(&params.sampler)?;
    let mut out = Generation {
        n_prompt: prompt.len(),
        ..Generation::default()
    };
    if params.max_tokens == 0 {
        return Ok(out);
    }
    let t0 = Instant::now();
    let mut logits = chain.step(session, prompt)?;
    out.prefill = t0.elapsed();
    let t1 = Instant::now();
    loop {
        let tok = sampler.sample(&logits, out.tokens.len() as u64)?;
        if params.keep_logits {
            out.logits.push(std::mem::take(&mut logits));
        }
        if is_eog(tok) {
            break;
        }
        out.tokens.push(tok);
        on_token(tok);
        if out.tokens.len() as u32 >= params.max_tokens
            || chain.position(session)? >= chain.ctx_per_session()
        {
            break;
        }
        logits = chain.step(session, &[tok])?;
        out.n_decode += 1;
    }
    out.decode = t1.elapsed();
    Ok(out)
}
