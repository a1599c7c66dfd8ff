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

use nakshatra_slicer::{keys, Gguf, MetaValue, TensorInfo};

pub use ffi::SamplerSpec;
use ffi::{BatchInput, ContextParams, FfiError, RawBatch, RawContext, RawModel, RawSampler};

/// Errors of the engine. Every one is a clear message for a user; none
/// leaves a session half-updated.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The GGUF could not be read.
    #[error("cannot read {path}: {source}")]
    Gguf {
        /// The model or slice file the engine was asked to load.
        path: PathBuf,
        /// What the GGUF reader refused (truncated, not GGUF, bad tensor...).
        #[source]
        source: nakshatra_slicer::GgufError,
    },
    /// llama.cpp refused the file or the context.
    #[error(transparent)]
    Llama(#[from] FfiError),
    /// `--device` names no device llama.cpp sees on this host.
    #[error("no device named {name:?} on this host; llama.cpp sees: {known}")]
    UnknownDevice {
        /// The name asked for.
        name: String,
        /// The devices there are (`NAME (description)`, comma-separated).
        known: String,
    },
    /// The file's metadata does not describe a usable slice.
    #[error("{path}: {reason}")]
    BadSlice {
        /// The model or slice file the engine was asked to load.
        path: PathBuf,
        /// What is wrong with its metadata (e.g. a missing block count or
        /// an impossible range), for people.
        reason: String,
    },
    /// A first range of a split model needs its token-embedding sidecar.
    #[error("{slice} starts at layer 0 but its token-embedding sidecar {sidecar} is missing or unusable: {reason}")]
    MissingEmbeddings {
        /// The first slice whose sidecar is needed.
        slice: PathBuf,
        /// Where the sidecar was looked for (`<slice>.embd.gguf`).
        sidecar: PathBuf,
        /// Why it is missing or unusable.
        #[source]
        reason: Box<EmbeddingsError>,
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
        /// Tokens already in the session's KV cache.
        have: u32,
        /// Tokens (positions) this step would add.
        adding: u32,
        /// Most tokens a session may hold ([`SliceEngine::ctx_per_session`]).
        limit: u32,
    },
    /// The input does not match what this range takes.
    #[error("bad input: {0}")]
    BadInput(String),
    /// Truncating to a position beyond the session's length.
    #[error("cannot truncate session {session} to {to}: it holds {have} tokens")]
    BadTruncate {
        /// The session asked to be truncated.
        session: u64,
        /// Length (in tokens) it was asked to be cut to.
        to: u32,
        /// Tokens it holds, less than `to`.
        have: u32,
    },
    /// The sampler could not pick a token.
    #[error("sampling failed")]
    Sampling,
    /// The tokenizer could not be loaded (no vocabulary in the file) or
    /// could not render the chat template; the message says which.
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
    /// Physical micro-batch size, in tokens: llama.cpp computes a step in
    /// graphs of at most this many tokens.
    pub n_ubatch: u32,
    /// Layers offloaded to a GPU backend (`-1`: all; ignored on CPU builds).
    pub gpu_layers: i32,
    /// The backend device the layers are offloaded to, by name as
    /// [`devices`] lists them (`CUDA0`, `Vulkan1`, `CPU`: no offload);
    /// `None`: llama.cpp's choice, every GPU with the layers split between
    /// them. A host with several GPUs runs one node per GPU, each with its
    /// own device and range.
    pub device: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            ctx_per_session: 2048,
            max_sessions: 8,
            n_ubatch: 512,
            gpu_layers: -1,
            device: None,
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
    /// Hidden width: floats per token in the hidden states this range
    /// takes and returns.
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
    /// Logits of the step's last positions (last range only): one row of
    /// `n_vocab` floats per position asked for, the earliest first (one
    /// row unless [`SliceEngine::forward_rows`] asked for more).
    Logits(Vec<f32>),
}

/// BLAKE3 of a logits row as little-endian f32 bytes: equal on two hosts
/// exactly when the logits are bit for bit the same (what `--verify`
/// compares).
pub fn logits_digest(logits: &[f32]) -> [u8; 32] {
    /// Floats converted per hash update: a 64 KiB stack buffer, no
    /// allocation per step (the last hop digests every step's logits),
    /// and updates large enough for BLAKE3 to hash many of its 1 KiB
    /// chunks at once with SIMD (a 49,152-float row: ~48 µs, against ~80
    /// µs in 4 KiB updates, on this project's 2-core machine).
    const CHUNK: usize = 16 * 1024;
    let mut h = blake3::Hasher::new();
    let mut buf = [0u8; 4 * CHUNK];
    for chunk in logits.chunks(CHUNK) {
        for (dst, x) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&x.to_le_bytes());
        }
        h.update(&buf[..4 * chunk.len()]);
    }
    *h.finalize().as_bytes()
}

/// Rows of logits a step of `n` positions can give: 1 to `n`.
fn check_rows(rows: usize, n: usize) -> Result<(), EngineError> {
    if rows == 0 || rows > n {
        return Err(EngineError::BadInput(format!(
            "{rows} rows of logits asked of a step of {n} positions"
        )));
    }
    Ok(())
}

/// Handle of a session inside one [`SliceEngine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

#[derive(Debug)]
struct Session {
    seq: i32,
    pos: u32,
}

/// Why a token-embedding table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddingsError {
    /// The file does not parse.
    #[error(transparent)]
    Gguf(#[from] nakshatra_slicer::GgufError),
    /// It has no `token_embd.weight`.
    #[error("no token_embd.weight tensor")]
    NoTensor,
    /// The tensor is not `[n_embd, n_vocab]`.
    #[error("token_embd.weight has shape {dims:?}, expected [{n_embd}, n_vocab]")]
    Shape {
        /// The tensor's dimensions.
        dims: Vec<u64>,
        /// The hidden size the range needs.
        n_embd: usize,
    },
    /// ggml cannot size its rows (unknown or unsupported type).
    #[error(transparent)]
    Type(#[from] FfiError),
    /// Its byte length does not match its shape.
    #[error("token_embd.weight size does not match its shape")]
    Size,
}

/// Looks token rows up in a `token_embd` tensor (the sidecar or the file
/// itself), converting with ggml's `to_float`.
struct Embedder {
    gguf: Gguf,
    tensor: TensorInfo,
    n_embd: usize,
    n_rows: usize,
    row_bytes: usize,
    /// The family's factor for token rows (Gemma: `sqrt(n_embd)`), which
    /// llama.cpp applies only to rows it looked up itself
    /// ([`nakshatra_slicer::Family::token_scale_for`]).
    scale: Option<f32>,
}

impl Embedder {
    fn open(path: &Path, n_embd: u32, scale: Option<f32>) -> Result<Self, EmbeddingsError> {
        let gguf = Gguf::open(path)?;
        let tensor = gguf
            .tensor("token_embd.weight")
            .cloned()
            .ok_or(EmbeddingsError::NoTensor)?;
        let n_embd = n_embd as usize;
        let shape_err = || EmbeddingsError::Shape {
            dims: tensor.dims.clone(),
            n_embd,
        };
        if tensor.dims.first().copied() != Some(n_embd as u64) || tensor.dims.len() != 2 {
            return Err(shape_err());
        }
        let n_rows = usize::try_from(tensor.dims[1]).map_err(|_| shape_err())?;
        let row_bytes = ffi::row_size(tensor.ggml_type, n_embd)?;
        if (row_bytes as u64).checked_mul(n_rows as u64) != Some(tensor.n_bytes) {
            return Err(EmbeddingsError::Size);
        }
        Ok(Self {
            gguf,
            tensor,
            n_embd,
            n_rows,
            row_bytes,
            scale,
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
            let row = ffi::ggml_to_f32(self.tensor.ggml_type, row, self.n_embd)?;
            match self.scale {
                // The same f32 multiply as the graph's `ggml_mul` by the
                // row scale: bit-identical to the whole model.
                Some(k) => out.extend(row.into_iter().map(|x| x * k)),
                None => out.extend(row),
            }
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

/// The device llama.cpp calls `name` (case does not matter), or
/// [`EngineError::UnknownDevice`] listing the devices there are.
pub fn find_device(name: &str) -> Result<llama_cpp_2::LlamaBackendDevice, EngineError> {
    let all = devices();
    let known = all
        .iter()
        .map(|d| format!("{} ({})", d.name, d.description))
        .collect::<Vec<_>>()
        .join(", ");
    all.into_iter()
        .find(|d| d.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| EngineError::UnknownDevice {
            name: name.to_string(),
            known,
        })
}

/// The GPUs `cfg` offloads a slice's weights to: none when it offloads no
/// layer or names a CPU device, its device when it names one, else every
/// GPU llama.cpp sees (its default: layers split between them). What
/// `--layers auto` sizes a range by when it offloads everything.
pub fn offload_devices(
    cfg: &EngineConfig,
) -> Result<Vec<llama_cpp_2::LlamaBackendDevice>, EngineError> {
    use llama_cpp_2::LlamaBackendDeviceType as T;
    let is_gpu =
        |d: &llama_cpp_2::LlamaBackendDevice| matches!(d.device_type, T::Gpu | T::IntegratedGpu);
    if cfg.gpu_layers == 0 {
        return Ok(Vec::new());
    }
    Ok(match cfg.device.as_deref() {
        Some(name) => Some(find_device(name)?)
            .filter(|d| is_gpu(d))
            .into_iter()
            .collect(),
        None => {
            // As llama.cpp: integrated GPUs only where there is no other.
            let all = devices();
            let kind = if all.iter().any(|d| d.device_type == T::Gpu) {
                T::Gpu
            } else {
                T::IntegratedGpu
            };
            all.into_iter().filter(|d| d.device_type == kind).collect()
        }
    })
}

/// llama.cpp's build and CPU feature summary.
pub fn system_info() -> String {
    // Computed once: `llama_print_system_info` rewrites a static buffer and
    // must not run on two threads at once. The backends it lists are fixed
    // once `init_backend` has run, so the line never changes afterwards.
    static INFO: OnceLock<String> = OnceLock::new();
    INFO.get_or_init(|| {
        init_backend();
        ffi::system_info()
    })
    .clone()
}

/// The CPU features this build of llama.cpp uses (`AVX2`, `FMA`, `NEON`,
/// ...), from its system info line (`CPU : SSE3 = 1 | AVX2 = 1 | ...`):
/// the names set to 1 in the CPU backend's part.
pub fn cpu_features() -> Vec<String> {
    parse_cpu_features(&system_info())
}

fn parse_cpu_features(info: &str) -> Vec<String> {
    let Some(cpu) = info.split("CPU :").nth(1) else {
        return Vec::new();
    };
    // The CPU part ends where another backend's `NAME :` starts.
    let cpu = cpu.split(" : ").next().unwrap_or(cpu);
    let mut out: Vec<String> = Vec::new();
    for item in cpu.split('|') {
        let Some((name, value)) = item.split_once('=') else {
            continue;
        };
        let name = name.trim();
        let plain = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if plain && value.trim() == "1" && !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
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
    /// llama.cpp threads for one-token decodes (see
    /// [`SliceEngine::forward_as_singles`]).
    single_threads: u32,
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
        let header = nakshatra_slicer::header_layers(&gguf).map_err(|e| bad(e.to_string()))?;
        let n_file_layers = header.n_layers;
        let family = nakshatra_slicer::family(&header.arch).map_err(|e| bad(e.to_string()))?;
        let (start, end, total) = match (
            gguf.get(keys::LAYER_START).and_then(MetaValue::as_u32),
            gguf.get(keys::LAYER_END).and_then(MetaValue::as_u32),
            gguf.get(keys::N_LAYERS_TOTAL).and_then(MetaValue::as_u32),
        ) {
            (Some(s), Some(e), Some(t)) if s < e && e <= t && e - s == n_file_layers => (s, e, t),
            (None, None, None) => (0, n_file_layers, n_file_layers),
            _ => return Err(bad("inconsistent nakshatra.layer_* metadata".into())),
        };
        if let (Some(why), true) = (family.hidden_input_refused, start > 0) {
            return Err(bad(format!("a slice that starts at layer {start}: {why}")));
        }
        drop(gguf);
        if cfg.max_sessions == 0 || cfg.ctx_per_session == 0 || cfg.n_ubatch == 0 {
            return Err(bad(
                "sessions, context and micro-batch must be positive".into()
            ));
        }

        let device = cfg.device.as_deref().map(find_device).transpose()?;
        let model = Arc::new(RawModel::load(
            path,
            cfg.gpu_layers,
            device.map(|d| d.index),
        )?);
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
                .unwrap_or_else(|| nakshatra_slicer::embd_sidecar_path(path));
            let scale = family.token_scale_for(layout.n_embd);
            Some(
                Embedder::open(&side, layout.n_embd, scale).map_err(|reason| {
                    EngineError::MissingEmbeddings {
                        slice: path.to_path_buf(),
                        sidecar: side.clone(),
                        reason: Box::new(reason),
                    }
                })?,
            )
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
            single_threads: cfg.threads.max(1),
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

    /// Most tokens (prompt and generated) one session may hold: what was
    /// configured, even where llama.cpp padded the context up.
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
        self.set_thread_counts(n, n);
    }

    /// Changes the llama.cpp thread counts: `single` for one-token steps,
    /// `batch` for steps of several tokens.
    pub fn set_thread_counts(&mut self, single: u32, batch: u32) {
        let t = |n: u32| i32::try_from(n.max(1)).unwrap_or(1);
        self.ctx.set_threads(t(single), t(batch));
        self.single_threads = single.max(1);
    }

    /// Opens a session with an empty KV cache.
    pub fn open_session(&mut self) -> Result<SessionId, EngineError> {
        let seq = self
            .free_seqs
            .pop()
            .ok_or(EngineError::Busy(self.max_sessions))?;
        // A slot is always empty when freed, but be certain.
        if !self.ctx.seq_rm(seq, 0) {
            tracing::error!(seq, "cannot clear a free KV slot; retiring it");
            return Err(EngineError::Busy(self.max_sessions));
        }
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
        if self.ctx.seq_rm(s.seq, 0) {
            self.free_seqs.push(s.seq);
        } else {
            // A slot that cannot be cleared is never handed out again.
            tracing::error!(
                seq = s.seq,
                "cannot clear a session's KV cache; retiring its slot"
            );
        }
        Ok(())
    }

    /// Runs this range's layers on one step of a session. On error the
    /// session's KV cache is as it was before the call.
    pub fn forward(
        &mut self,
        id: SessionId,
        input: StepInput<'_>,
    ) -> Result<StepOutput, EngineError> {
        self.forward_rows(id, input, 1)
    }

    /// [`SliceEngine::forward`], where the last range returns the logits
    /// of the step's last `rows` positions (a speculative verify: every
    /// drafted position's logits in one pass). Other ranges return every
    /// row's hidden state whatever `rows` says.
    pub fn forward_rows(
        &mut self,
        id: SessionId,
        input: StepInput<'_>,
        rows: usize,
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
                self.check_tokens(tokens)?;
                match &self.embedder {
                    Some(e) => {
                        looked_up = e.rows(tokens)?;
                        BatchInput::Embd {
                            data: &looked_up,
                            n_embd,
                        }
                    }
                    None => BatchInput::Tokens(tokens),
                }
            }
            StepInput::Hidden(h) => {
                self.check_hidden(h)?;
                BatchInput::Embd { data: h, n_embd }
            }
        };
        check_rows(rows, n)?;
        // A range that hands hidden states on keeps every row; the last
        // range computes the head only for the rows asked for.
        let outputs = if self.layout.is_last() { rows } else { n };
        let batch = RawBatch::new(batch_input, seq, pos as i32, outputs)
            .ok_or_else(|| EngineError::BadInput("cannot build batch".into()))?;
        let out = self
            .ctx
            .decode(&batch)
            .map_err(EngineError::from)
            .and_then(|captured| self.step_output(captured, n, rows));
        match out {
            Ok(out) => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.pos = pos + adding;
                }
                Ok(out)
            }
            Err(e) => {
                // Undo whatever micro-batches made it into the cache. If
                // llama.cpp cannot, the cache no longer matches the
                // session's position: the session is closed rather than
                // left to compute on a wrong cache.
                if !self.ctx.seq_rm(seq, pos as i32) {
                    tracing::error!(
                        session = id.0,
                        "cannot roll the KV cache back after a failed step; closing the session"
                    );
                    let _ = self.close_session(id);
                }
                Err(e)
            }
        }
    }

    /// [`SliceEngine::forward_rows`] for a step that stands for one-token
    /// steps (a speculative verify, a replay of decoded tokens): every row
    /// comes out bit for bit as a one-token step at its position would
    /// have given it.
    ///
    /// One batch does that only while one-token decodes run on one
    /// thread: past 512 positions of KV, ggml-cpu's flash attention splits
    /// a one-token decode's KV into one chunk per thread and adds the
    /// chunks up in another order than a batch's rows (measured by
    /// `node/tests/speculative.rs`). With more threads the rows are
    /// decoded one at a time: still one network pass, `n` engine passes.
    /// On error the session is as it was.
    pub fn forward_as_singles(
        &mut self,
        id: SessionId,
        input: StepInput<'_>,
        rows: usize,
    ) -> Result<StepOutput, EngineError> {
        let n_embd = self.layout.n_embd as usize;
        let n = input.n_tokens(n_embd);
        if n <= 1 || self.single_threads <= 1 {
            return self.forward_rows(id, input, rows);
        }
        check_rows(rows, n)?;
        let pos0 = self.position(id)?;
        let mut out = Vec::new();
        for i in 0..n {
            let one = match input {
                StepInput::Tokens(t) => StepInput::Tokens(&t[i..i + 1]),
                StepInput::Hidden(h) => StepInput::Hidden(&h[i * n_embd..(i + 1) * n_embd]),
            };
            match self.forward_rows(id, one, 1) {
                Ok(StepOutput::Hidden(h)) => out.extend_from_slice(&h),
                Ok(StepOutput::Logits(l)) if i + rows >= n => out.extend_from_slice(&l),
                Ok(StepOutput::Logits(_)) => {}
                Err(e) => {
                    if self.truncate(id, pos0).is_err() {
                        let _ = self.close_session(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(if self.layout.is_last() {
            StepOutput::Logits(out)
        } else {
            StepOutput::Hidden(out)
        })
    }

    /// Token ids are only for the first range, and must be in the
    /// vocabulary (checked again by the embedder of a split model).
    fn check_tokens(&self, tokens: &[i32]) -> Result<(), EngineError> {
        if !self.layout.is_first() {
            return Err(EngineError::BadInput(format!(
                "layers {}..{} take hidden states, not tokens",
                self.layout.start, self.layout.end
            )));
        }
        if self.embedder.is_none() {
            if let Some(bad) = tokens
                .iter()
                .find(|&&t| t < 0 || t as usize >= self.n_vocab)
            {
                return Err(EngineError::BadInput(format!(
                    "token id {bad} outside vocab 0..{}",
                    self.n_vocab
                )));
            }
        }
        Ok(())
    }

    /// Hidden states are for every range but the first, whole rows of
    /// finite numbers.
    fn check_hidden(&self, h: &[f32]) -> Result<(), EngineError> {
        let n_embd = self.layout.n_embd as usize;
        if self.layout.is_first() {
            return Err(EngineError::BadInput(format!(
                "layers {}..{} take tokens, not hidden states",
                self.layout.start, self.layout.end
            )));
        }
        if !h.len().is_multiple_of(n_embd) {
            return Err(EngineError::BadInput(format!(
                "{} floats is not a whole number of {n_embd}-wide rows",
                h.len()
            )));
        }
        if h.iter().any(|x| !x.is_finite()) {
            return Err(EngineError::BadInput("hidden state is not finite".into()));
        }
        Ok(())
    }

    /// What a decoded step of `n` tokens gives: the last `rows` positions'
    /// logits at the last range, else the `captured` hidden states of every
    /// row.
    fn step_output(
        &mut self,
        captured: Vec<f32>,
        n: usize,
        rows: usize,
    ) -> Result<StepOutput, EngineError> {
        let n_embd = self.layout.n_embd as usize;
        if self.layout.is_last() {
            return Ok(StepOutput::Logits(self.ctx.logits_rows(rows)?));
        }
        if captured.len() != n * n_embd {
            return Err(FfiError::Capture(format!(
                "captured {} floats, expected {}",
                captured.len(),
                n * n_embd
            ))
            .into());
        }
        Ok(StepOutput::Hidden(captured))
    }

    /// The file this engine loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A session's sampling: greedy when `temperature <= 0`; otherwise top-k,
/// top-p, temperature and a draw seeded per step.
///
/// The draw of step `s` is seeded with [`step_seed`]`(seed, s)`, not taken
/// from one generator running through the session, so a step's token
/// depends only on its logits, the spec and its step number: a session
/// resumed on another last hop (or replayed) draws exactly what it would
/// have drawn.
pub struct Sampler {
    spec: SamplerSpec,
}

/// llama.cpp's greedy choice (`llama_sampler_greedy_apply`), without
/// building its candidates array (12 bytes a token, 590 KB for a
/// 49,152-token vocabulary, every step): the first index whose logit no
/// later one exceeds, compared with `>` exactly as llama.cpp does (so a
/// NaN is never chosen over an earlier number, and a NaN first stays
/// chosen). `None` for no logits. Two passes that the compiler
/// vectorises (the greatest value, then its first position): ~7 µs a
/// 49,152-token row, against ~78 µs for the one-by-one fold.
pub fn greedy_token(logits: &[f32]) -> Option<i32> {
    /// Lanes of the max pass: wide enough for the compiler to keep them
    /// in SIMD registers (a compare and a blend per lane).
    const LANES: usize = 16;
    let (&first, _) = logits.split_first()?;
    // A NaN first is never exceeded (`>` with a NaN is false).
    if first.is_nan() {
        return Some(0);
    }
    // The greatest value by `>` (NaNs never win), lane by lane, then
    // across the lanes: the same value the one-by-one fold ends on.
    let pick = |m: f32, l: f32| if l > m { l } else { m };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            *m = pick(*m, l);
        }
    }
    let mut max = lanes.iter().fold(first, |m, &l| pick(m, l));
    max = chunks.remainder().iter().fold(max, |m, &l| pick(m, l));
    // Its first position is the fold's pick: an earlier position never
    // holds an equal value (`==`: -0 and +0 are one), later equal ones
    // never replace it.
    let best = logits.iter().position(|&l| l == max)?;
    i32::try_from(best).ok()
}

impl Sampler {
    /// A sampler for `spec` (a chain is built once here, so a spec
    /// llama.cpp refuses fails now, not at the first token).
    pub fn new(spec: &SamplerSpec) -> Result<Self, EngineError> {
        RawSampler::new(spec).ok_or(EngineError::Sampling)?;
        Ok(Self { spec: *spec })
    }

    /// Picks the token of step `step` from one row of logits.
    pub fn sample(&mut self, logits: &[f32], step: u64) -> Result<i32, EngineError> {
        if self.spec.temperature <= 0.0 {
            return greedy_token(logits).ok_or(EngineError::Sampling);
        }
        let spec = SamplerSpec {
            seed: step_seed(self.spec.seed, step),
            ..self.spec
        };
        RawSampler::new(&spec)
            .and_then(|mut s| s.sample(logits))
            .ok_or(EngineError::Sampling)
    }
}

/// The seed of step `step`'s draw in a session seeded with `seed`
/// (splitmix64 of both, folded to 32 bits).
pub fn step_seed(seed: u32, step: u64) -> u32 {
    let mut z =
        (u64::from(seed) << 32 | u64::from(seed)) ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z ^ (z >> 32)) as u32
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

#[cfg(test)]
mod tests {
    use super::{ffi::RawSampler, greedy_token, logits_digest, SamplerSpec};

    #[test]
    fn greedy_picks_what_llama_cpp_picks() {
        let greedy = SamplerSpec {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
        };
        let nan = f32::NAN;
        let rows: Vec<Vec<f32>> = vec![
            vec![1.0],
            vec![0.5, 2.0, 2.0, -1.0],
            vec![nan, 3.0, 1.0],
            vec![1.0, nan, 3.0, nan],
            vec![f32::NEG_INFINITY, f32::NEG_INFINITY],
            vec![-0.0, 0.0],
            (0..49_152)
                .map(|i| ((i * 7919) % 1000) as f32 * 0.01)
                .collect(),
            vec![-0.0, 0.0, -0.0],
            vec![0.0, -0.0],
            vec![1.0, 2.0, nan, 2.0],
        ];
        // Long rows with ties, NaNs, zeros of both signs and infinities
        // at every lane offset, and the maximum at the edges.
        let mut rows = rows;
        let mut x = 7u64;
        for len in [1usize, 15, 16, 17, 33, 1000, 49_152] {
            for _ in 0..20 {
                let row: Vec<f32> = (0..len)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        match (x >> 59) as u8 {
                            0 => nan,
                            1 => f32::INFINITY,
                            2 => f32::NEG_INFINITY,
                            3 => -0.0,
                            4 => 0.0,
                            _ => ((x >> 40) % 64) as f32 * 0.5 - 16.0,
                        }
                    })
                    .collect();
                rows.push(row);
            }
        }
        for row in rows {
            let mut llama = RawSampler::new(&greedy).expect("greedy chain");
            assert_eq!(
                greedy_token(&row),
                llama.sample(&row),
                "{:?}",
                &row[..row.len().min(4)]
            );
        }
        assert_eq!(greedy_token(&[]), None);
    }

    #[test]
    fn cpu_features_come_from_the_cpu_part_of_the_system_info() {
        let info = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 0 | AVX2 = 1 | \
                    LLAMAFILE = 1 | REPACK = 1 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | ";
        assert_eq!(
            super::parse_cpu_features(info),
            ["SSE3", "SSSE3", "AVX", "AVX2", "LLAMAFILE", "REPACK"]
        );
        assert!(super::parse_cpu_features("no cpu here").is_empty());
        // This build's: whatever it is, plain names only.
        for f in super::cpu_features() {
            assert!(!f.is_empty() && f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        }
    }

    #[test]
    fn the_logits_digest_is_blake3_of_the_little_endian_bytes() {
        // Not a multiple of the chunk, so the last update is short.
        let logits: Vec<f32> = (0..49_153).map(|i| i as f32 * 0.5 - 1000.0).collect();
        let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(logits_digest(&logits), *blake3::hash(&bytes).as_bytes());
        assert_eq!(logits_digest(&[]), *blake3::hash(&[]).as_bytes());
    }
}
