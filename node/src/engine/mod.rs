//! The slice engine: runs a contiguous range of a model's layers with stock
//! llama.cpp.
//!
//! A [`SliceEngine`] loads one GGUF — the whole model or a slice written by
//! `nakshatra-slicer` — and serves many [`SessionId`]s at once, each with its
//! own KV cache (a llama.cpp sequence id in a non-unified KV cache). One
//! forward step takes token ids (the first range) or hidden states (every
//! later range) and returns hidden states (every range but the last) or the
//! logits of the last position (the last range).
//!
//! How the hand-off works (see `docs/ARCHITECTURE.md`, "exactness"):
//! * hidden states *in*: an embedding batch (`llama_batch.embd`);
//! * hidden states *out*: an eval callback copies `l_out-{n_layer-1}` for
//!   every micro-batch, with every row marked as output so the last layer
//!   keeps them all;
//! * the first range of a split model looks token rows up itself from the
//!   embedding sidecar with ggml's own `to_float` (bit-exact with the
//!   in-graph `get_rows`).

mod ffi;
pub mod pipeline;
pub mod service;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nakshatra_slicer::{Gguf, MetaValue, TensorInfo};

pub use ffi::SamplerSpec;
use ffi::{BatchInput, ContextParams, FfiError, RawBatch, RawContext, RawModel, RawSampler};

/// Errors of the engine. Every one is a clear message for a user; none
/// leaves a session half-updated.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The GGUF could not be read.
    #[error("cannot read {path}: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: nakshatra_slicer::GgufError,
    },
    /// llama.cpp refused the file or the context.
    #[error(transparent)]
    Llama(#[from] FfiError),
    /// The file's metadata does not describe a usable slice.
    #[error("{path}: {reason}")]
    BadSlice {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A first range of a split model needs its token-embedding sidecar.
    #[error("{slice} starts at layer 0 but its token-embedding sidecar {sidecar} is missing or unusable: {reason}")]
    MissingEmbeddings {
        /// The slice.
        slice: PathBuf,
        /// Where the sidecar was looked for.
        sidecar: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// No such session (never opened, or closed).
    #[error("unknown session {0}")]
    UnknownSession(u64),
    /// Every session slot is in use.
    #[error("all {0} session slots are in use")]
    Busy(u32),
    /// The step does not fit in the session's context.
    #[error("context full: {have} tokens + {adding} new > {limit} per session")]
    ContextFull {
        /// Tokens already in the session.
        have: u32,
        /// Tokens in this step.
        adding: u32,
        /// Tokens a session holds.
        limit: u32,
    },
    /// The input does not match what this range takes.
    #[error("bad input: {0}")]
    BadInput(String),
    /// Truncating to a position beyond the session's length.
    #[error("cannot truncate session {session} to {to}: it holds {have} tokens")]
    BadTruncate {
        /// Session.
        session: u64,
        /// Position asked for.
        to: u32,
        /// Its length.
        have: u32,
    },
    /// The sampler could not pick a token.
    #[error("sampling failed")]
    Sampling,
    /// A tokenizer problem.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

/// Engine settings, shared by every range a process runs.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// CPU threads for llama.cpp. Processes sharing a host must not add up
    /// to more than its cores (OpenMP threads spin and collapse).
    pub threads: u32,
    /// Tokens one session holds (prompt + generated).
    pub ctx_per_session: u32,
    /// Sessions that can live at once in one loaded range.
    pub max_sessions: u32,
    /// Physical micro-batch size.
    pub n_ubatch: u32,
    /// Layers offloaded to a GPU backend (`-1`: all; ignored on CPU builds).
    pub gpu_layers: i32,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            ctx_per_session: 2048,
            max_sessions: 8,
            n_ubatch: 512,
            gpu_layers: -1,
        }
    }
}

/// All cores of this host.
pub fn default_threads() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Where a file sits in the whole model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// First layer (in the whole model).
    pub start: u32,
    /// One past the last layer.
    pub end: u32,
    /// Layers of the whole model.
    pub n_layers_total: u32,
    /// Hidden width.
    pub n_embd: u32,
}

impl Layout {
    /// Holds layer 0: takes token ids.
    pub fn is_first(&self) -> bool {
        self.start == 0
    }
    /// Holds the last layer: produces logits.
    pub fn is_last(&self) -> bool {
        self.end == self.n_layers_total
    }
}

/// Input of one forward step.
#[derive(Debug, Clone, Copy)]
pub enum StepInput<'a> {
    /// Token ids (first range only).
    Tokens(&'a [i32]),
    /// Hidden states, `n_embd` floats per token, row-major.
    Hidden(&'a [f32]),
}

impl StepInput<'_> {
    fn n_tokens(&self, n_embd: usize) -> usize {
        match self {
            StepInput::Tokens(t) => t.len(),
            StepInput::Hidden(h) => h.len() / n_embd.max(1),
        }
    }
}

/// Output of one forward step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// Hidden states after this range's last layer, one row per input token.
    Hidden(Vec<f32>),
    /// Logits of the step's last position (last range only).
    Logits(Vec<f32>),
}

/// Handle of a session inside one [`SliceEngine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

#[derive(Debug)]
struct Session {
    seq: i32,
    pos: u32,
}

/// Looks token rows up in a `token_embd` tensor (the sidecar or the file
/// itself), converting with ggml's `to_float`.
struct Embedder {
    gguf: Gguf,
    tensor: TensorInfo,
    n_embd: usize,
    n_rows: usize,
    row_bytes: usize,
}

impl Embedder {
    fn open(path: &Path, n_embd: u32) -> Result<Self, String> {
        let gguf = Gguf::open(path).map_err(|e| e.to_string())?;
        let tensor = gguf
            .tensor("token_embd.weight")
            .cloned()
            .ok_or("no token_embd.weight tensor")?;
        let n_embd = n_embd as usize;
        if tensor.dims.first().copied() != Some(n_embd as u64) || tensor.dims.len() != 2 {
            return Err(format!(
                "token_embd.weight has shape {:?}, expected [{n_embd}, n_vocab]",
                tensor.dims
            ));
        }
        let n_rows = usize::try_from(tensor.dims[1]).map_err(|e| e.to_string())?;
        let row_bytes = ffi::row_size(tensor.ggml_type, n_embd).map_err(|e| e.to_string())?;
        if (row_bytes as u64).checked_mul(n_rows as u64) != Some(tensor.n_bytes) {
            return Err("token_embd.weight size does not match its shape".into());
        }
        Ok(Self {
            gguf,
            tensor,
            n_embd,
            n_rows,
            row_bytes,
        })
    }

    fn rows(&self, tokens: &[i32]) -> Result<Vec<f32>, EngineError> {
        let data = self.gguf.tensor_data(&self.tensor);
        let mut out = Vec::with_capacity(tokens.len() * self.n_embd);
        for &t in tokens {
            let i = usize::try_from(t)
                .ok()
                .filter(|&i| i < self.n_rows)
                .ok_or_else(|| {
                    EngineError::BadInput(format!("token id {t} outside vocab 0..{}", self.n_rows))
                })?;
            let row = data
                .get(i * self.row_bytes..(i + 1) * self.row_bytes)
                .ok_or_else(|| EngineError::BadInput("embedding row out of file".into()))?;
            out.extend(ffi::ggml_to_f32(self.tensor.ggml_type, row, self.n_embd)?);
        }
        Ok(out)
    }
}

fn backend() -> &'static Option<llama_cpp_2::llama_backend::LlamaBackend> {
    static BACKEND: OnceLock<Option<llama_cpp_2::llama_backend::LlamaBackend>> = OnceLock::new();
    BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        llama_cpp_2::llama_backend::LlamaBackend::init().ok()
    })
}

/// Makes sure llama.cpp's backends are initialised (once per process) and
/// its logs go to `tracing`.
pub fn init_backend() {
    let _ = backend();
}

/// Backend devices llama.cpp sees on this host (CPU, CUDA0, ...).
pub fn devices() -> Vec<llama_cpp_2::LlamaBackendDevice> {
    init_backend();
    llama_cpp_2::list_llama_ggml_backend_devices()
}

/// llama.cpp's build and CPU feature summary.
pub fn system_info() -> String {
    init_backend();
    ffi::system_info()
}

fn meta_u32(g: &Gguf, key: &str) -> Option<u32> {
    match g.get(key)? {
        MetaValue::U32(v) => Some(*v),
        MetaValue::I32(v) => u32::try_from(*v).ok(),
        MetaValue::U64(v) => u32::try_from(*v).ok(),
        MetaValue::I64(v) => u32::try_from(*v).ok(),
        MetaValue::U16(v) => Some(u32::from(*v)),
        MetaValue::U8(v) => Some(u32::from(*v)),
        _ => None,
    }
}

/// Path of the token-embedding sidecar the slicer writes next to a first
/// slice: `<slice>.embd.gguf`.
pub fn sidecar_path(slice: &Path) -> PathBuf {
    nakshatra_slicer::embd_sidecar_path(slice)
}

/// One loaded range of layers serving many sessions.
pub struct SliceEngine {
    ctx: RawContext,
    layout: Layout,
    n_vocab: usize,
    /// `Some` for the first range of a split model (tokens looked up here).
    embedder: Option<Embedder>,
    sessions: HashMap<SessionId, Session>,
    free_seqs: Vec<i32>,
    next_id: u64,
    n_ctx_seq: u32,
    max_sessions: u32,
    path: PathBuf,
}

impl std::fmt::Debug for SliceEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SliceEngine")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl SliceEngine {
    /// Loads a whole model or a slice. A first slice of a split model
    /// (starts at 0, ends before the last layer) reads token rows from
    /// `embeddings`, or from its sidecar (`<slice>.embd.gguf`) when `None`.
    pub fn load(
        path: &Path,
        embeddings: Option<&Path>,
        cfg: &EngineConfig,
    ) -> Result<Self, EngineError> {
        init_backend();
        let bad = |reason: String| EngineError::BadSlice {
            path: path.to_path_buf(),
            reason,
        };
        let gguf = Gguf::open(path).map_err(|source| EngineError::Gguf {
            path: path.to_path_buf(),
            source,
        })?;
        let arch = match gguf.get("general.architecture") {
            Some(MetaValue::String(a)) => a.clone(),
            _ => return Err(bad("no general.architecture".into())),
        };
        nakshatra_slicer::supported_arch(&arch).map_err(|e| bad(e.to_string()))?;
        let n_file_layers = meta_u32(&gguf, &format!("{arch}.block_count"))
            .ok_or_else(|| bad(format!("no {arch}.block_count")))?;
        let (start, end, total) = match (
            meta_u32(&gguf, "nakshatra.layer_start"),
            meta_u32(&gguf, "nakshatra.layer_end"),
            meta_u32(&gguf, "nakshatra.n_layers_total"),
        ) {
            (Some(s), Some(e), Some(t)) if s < e && e <= t && e - s == n_file_layers => (s, e, t),
            (None, None, None) => (0, n_file_layers, n_file_layers),
            _ => return Err(bad("inconsistent nakshatra.layer_* metadata".into())),
        };
        drop(gguf);
        if cfg.max_sessions == 0 || cfg.ctx_per_session == 0 || cfg.n_ubatch == 0 {
            return Err(bad(
                "sessions, context and micro-batch must be positive".into()
            ));
        }

        let model = Arc::new(RawModel::load(path, cfg.gpu_layers)?);
        let layout = Layout {
            start,
            end,
            n_layers_total: total,
            n_embd: model.n_embd(),
        };
        if model.n_layer() != end - start {
            return Err(bad(format!(
                "llama.cpp sees {} layers, metadata says {}",
                model.n_layer(),
                end - start
            )));
        }
        let embedder = if layout.is_first() && !layout.is_last() {
            let side = embeddings
                .map(Path::to_path_buf)
                .unwrap_or_else(|| sidecar_path(path));
            Some(Embedder::open(&side, layout.n_embd).map_err(|reason| {
                EngineError::MissingEmbeddings {
                    slice: path.to_path_buf(),
                    sidecar: side.clone(),
                    reason,
                }
            })?)
        } else {
            None
        };
        let capture = (!layout.is_last()).then(|| format!("l_out-{}", end - start - 1));
        let ctx = RawContext::new(
            model.clone(),
            &ContextParams {
                n_ctx_seq: cfg.ctx_per_session,
                n_seq: cfg.max_sessions,
                n_batch: cfg.ctx_per_session,
                n_ubatch: cfg.n_ubatch,
                n_threads: i32::try_from(cfg.threads.max(1)).unwrap_or(1),
                capture,
            },
        )?;
        // llama.cpp pads the per-sequence context; we keep to what was asked
        // so every range of a chain has the same limit.
        let n_ctx_seq = ctx.n_ctx_seq().min(cfg.ctx_per_session);
        let n_vocab = model.n_vocab() as usize;
        tracing::info!(
            path = %path.display(), start, end, total, n_embd = layout.n_embd,
            "loaded layers {start}..{end} of {total}"
        );
        Ok(Self {
            ctx,
            layout,
            n_vocab,
            embedder,
            sessions: HashMap::new(),
            free_seqs: (0..cfg.max_sessions as i32).rev().collect(),
            next_id: 1,
            n_ctx_seq,
            max_sessions: cfg.max_sessions,
            path: path.to_path_buf(),
        })
    }

    /// Where this file sits in the whole model.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Vocabulary size of the logits this range returns (last range only).
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Tokens one session holds.
    pub fn ctx_per_session(&self) -> u32 {
        self.n_ctx_seq
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Session slots still free.
    pub fn free_sessions(&self) -> usize {
        self.free_seqs.len()
    }

    /// Changes the llama.cpp thread count.
    pub fn set_threads(&mut self, n: u32) {
        self.ctx.set_threads(i32::try_from(n.max(1)).unwrap_or(1));
    }

    /// Opens a session with an empty KV cache.
    pub fn open_session(&mut self) -> Result<SessionId, EngineError> {
        let seq = self
            .free_seqs
            .pop()
            .ok_or(EngineError::Busy(self.max_sessions))?;
        // A slot is always empty when freed, but be certain.
        self.ctx.seq_rm(seq, 0);
        let id = SessionId(self.next_id);
        self.next_id += 1;
        self.sessions.insert(id, Session { seq, pos: 0 });
        Ok(id)
    }

    /// Number of positions a session holds.
    pub fn position(&self, id: SessionId) -> Result<u32, EngineError> {
        self.sessions
            .get(&id)
            .map(|s| s.pos)
            .ok_or(EngineError::UnknownSession(id.0))
    }

    /// Drops positions `pos..` of a session (for replays and retries).
    pub fn truncate(&mut self, id: SessionId, pos: u32) -> Result<(), EngineError> {
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(EngineError::UnknownSession(id.0))?;
        if pos > s.pos {
            return Err(EngineError::BadTruncate {
                session: id.0,
                to: pos,
                have: s.pos,
            });
        }
        if !self.ctx.seq_rm(s.seq, pos as i32) {
            return Err(EngineError::BadInput(format!(
                "llama.cpp could not truncate session {} to {pos}",
                id.0
            )));
        }
        s.pos = pos;
        Ok(())
    }

    /// Closes a session and frees its KV cache.
    pub fn close_session(&mut self, id: SessionId) -> Result<(), EngineError> {
        let s = self
            .sessions
            .remove(&id)
            .ok_or(EngineError::UnknownSession(id.0))?;
        self.ctx.seq_rm(s.seq, 0);
        self.free_seqs.push(s.seq);
        Ok(())
    }

    /// Runs this range's layers on one step of a session. On error the
    /// session's KV cache is as it was before the call.
    pub fn forward(
        &mut self,
        id: SessionId,
        input: StepInput<'_>,
    ) -> Result<StepOutput, EngineError> {
        let n_embd = self.layout.n_embd as usize;
        let (seq, pos) = {
            let s = self
                .sessions
                .get(&id)
                .ok_or(EngineError::UnknownSession(id.0))?;
            (s.seq, s.pos)
        };
        let n = input.n_tokens(n_embd);
        if n == 0 {
            return Err(EngineError::BadInput("empty step".into()));
        }
        let adding = u32::try_from(n).unwrap_or(u32::MAX);
        if pos.saturating_add(adding) > self.n_ctx_seq {
            return Err(EngineError::ContextFull {
                have: pos,
                adding,
                limit: self.n_ctx_seq,
            });
        }
        let looked_up;
        let batch_input = match input {
            StepInput::Tokens(tokens) => {
                if !self.layout.is_first() {
                    return Err(EngineError::BadInput(format!(
                        "layers {}..{} take hidden states, not tokens",
                        self.layout.start, self.layout.end
                    )));
                }
                match &self.embedder {
                    Some(e) => {
                        looked_up = e.rows(tokens)?;
                        BatchInput::Embd {
                            data: &looked_up,
                            n_embd,
                        }
                    }
                    None => {
                        if let Some(bad) = tokens
                            .iter()
                            .find(|&&t| t < 0 || t as usize >= self.n_vocab)
                        {
                            return Err(EngineError::BadInput(format!(
                                "token id {bad} outside vocab 0..{}",
                                self.n_vocab
                            )));
                        }
                        BatchInput::Tokens(tokens)
                    }
                }
            }
            StepInput::Hidden(h) => {
                if self.layout.is_first() {
                    return Err(EngineError::BadInput(format!(
                        "layers {}..{} take tokens, not hidden states",
                        self.layout.start, self.layout.end
                    )));
                }
                if h.len() % n_embd != 0 {
                    return Err(EngineError::BadInput(format!(
                        "{} floats is not a whole number of {n_embd}-wide rows",
                        h.len()
                    )));
                }
                if h.iter().any(|x| !x.is_finite()) {
                    return Err(EngineError::BadInput("hidden state is not finite".into()));
                }
                BatchInput::Embd { data: h, n_embd }
            }
        };
        let last = self.layout.is_last();
        let batch = RawBatch::new(batch_input, seq, pos as i32, !last)
            .ok_or_else(|| EngineError::BadInput("cannot build batch".into()))?;
        let captured = match self.ctx.decode(&batch) {
            Ok(c) => c,
            Err(e) => {
                // Undo whatever micro-batches made it into the cache.
                self.ctx.seq_rm(seq, pos as i32);
                return Err(e.into());
            }
        };
        let out = if last {
            match self.ctx.logits(-1, self.n_vocab) {
                Ok(l) => StepOutput::Logits(l),
                Err(e) => {
                    self.ctx.seq_rm(seq, pos as i32);
                    return Err(e.into());
                }
            }
        } else {
            if captured.len() != n * n_embd {
                self.ctx.seq_rm(seq, pos as i32);
                return Err(FfiError::Capture(format!(
                    "captured {} floats, expected {}",
                    captured.len(),
                    n * n_embd
                ))
                .into());
            }
            StepOutput::Hidden(captured)
        };
        if let Some(s) = self.sessions.get_mut(&id) {
            s.pos = pos + adding;
        }
        Ok(out)
    }

    /// The file this engine loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A llama.cpp sampler chain for one session.
pub struct Sampler(RawSampler);

impl Sampler {
    /// Greedy when `temperature <= 0`; otherwise top-k, top-p, temperature
    /// and a seeded draw.
    pub fn new(spec: &SamplerSpec) -> Result<Self, EngineError> {
        RawSampler::new(spec).map(Self).ok_or(EngineError::Sampling)
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<i32, EngineError> {
        self.0.sample(logits).ok_or(EngineError::Sampling)
    }
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sampler")
    }
}

impl SliceEngine {
    /// Measures decode speed through this range: a short prefill, then
    /// `steps` one-token steps in a scratch session. Returns one-token steps
    /// per second through the whole range.
    pub fn measure_decode(&mut self, steps: u32) -> Result<f64, EngineError> {
        let id = self.open_session()?;
        let r = self.measure_in(id, steps.max(1));
        let _ = self.close_session(id);
        r
    }

    fn measure_in(&mut self, id: SessionId, steps: u32) -> Result<f64, EngineError> {
        let n_embd = self.layout.n_embd as usize;
        // Deterministic, bounded stand-ins for real hidden states / tokens.
        let hidden = |n: usize| -> Vec<f32> {
            (0..n * n_embd)
                .map(|i| ((i as f32) * 0.37).sin() * 0.1)
                .collect()
        };
        let prefill = 8usize;
        let first = self.layout.is_first();
        let tokens: Vec<i32> = (0..prefill as i32).map(|i| 100 + i).collect();
        let h = hidden(prefill);
        let input = |n: usize| {
            if first {
                StepInput::Tokens(&tokens[..n])
            } else {
                StepInput::Hidden(&h[..n * n_embd])
            }
        };
        self.forward(id, input(prefill))?;
        let t0 = std::time::Instant::now();
        for _ in 0..steps {
            self.forward(id, input(1))?;
        }
        Ok(f64::from(steps) / t0.elapsed().as_secs_f64().max(1e-9))
    }
}
