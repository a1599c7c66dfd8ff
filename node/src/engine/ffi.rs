//! The one module that calls llama.cpp through raw FFI (`llama-cpp-sys-2`).
//!
//! The safe `llama-cpp-2` API has no embedding batches, no eval callback and
//! keeps its raw pointers private, so running a layer range needs the raw
//! API. Everything `unsafe` in the crate lives here, behind small owning
//! types whose invariants are:
//!
//! * [`RawModel`] owns a non-null `llama_model*` from
//!   `llama_model_load_from_file` and frees it exactly once on drop. A model
//!   is immutable after loading and llama.cpp allows it to be shared by
//!   contexts on other threads, hence `Send + Sync`.
//! * [`RawContext`] owns a non-null `llama_context*` created from a model
//!   that it keeps alive through an `Arc<RawModel>` (the context must be
//!   freed before its model; field order guarantees it). A context is used by
//!   one thread at a time (`&mut self` on every call), so it is `Send` but
//!   not `Sync`.
//! * The eval-callback state ([`Capture`]) is boxed and its address handed
//!   to llama.cpp as `cb_eval_user_data`; the box lives as long as the
//!   context, never moves, and is only touched by llama.cpp inside
//!   `llama_decode`, which we call with `&mut self`, so no other reference
//!   exists while the callback runs.
//! * [`RawBatch`] owns a `llama_batch` from `llama_batch_init` and frees it
//!   on drop; it is filled only within the capacity it was allocated with.
//! * [`RawSampler`] owns a sampler chain and frees it on drop.
//! * Every pointer returned by llama.cpp is null-checked before use, and
//!   every length read from llama.cpp is checked before slicing.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use llama_cpp_sys_2 as sys;

/// Errors from the FFI layer; wrapped by the engine's error type.
#[derive(Debug, thiserror::Error)]
pub enum FfiError {
    /// llama.cpp refused to load the file.
    #[error("llama.cpp could not load model {path}")]
    LoadModel {
        /// The file.
        path: String,
    },
    /// llama.cpp refused to create a context.
    #[error("llama.cpp could not create a context (n_ctx {n_ctx}, sessions {n_seq})")]
    NewContext {
        /// Total context size asked for.
        n_ctx: u32,
        /// Sequences asked for.
        n_seq: u32,
    },
    /// `llama_decode` failed.
    #[error("llama_decode failed with code {0}")]
    Decode(i32),
    /// The eval callback saw an unexpected tensor.
    #[error("hidden-state capture failed: {0}")]
    Capture(String),
    /// A path or string had an interior NUL.
    #[error("string contains a NUL byte")]
    Nul,
    /// llama.cpp returned no logits for a row.
    #[error("no logits for output row {0}")]
    NoLogits(i32),
    /// A ggml type has no float conversion.
    #[error("ggml type {0} cannot be converted to f32")]
    NoToFloat(u32),
}

/// Parameters for a context; see [`RawContext::new`].
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// Tokens per sequence.
    pub n_ctx_seq: u32,
    /// Number of sequences (sessions).
    pub n_seq: u32,
    /// Logical batch (largest single `llama_decode`).
    pub n_batch: u32,
    /// Physical micro-batch.
    pub n_ubatch: u32,
    /// Threads for decode and for prefill.
    pub n_threads: i32,
    /// Name of the tensor to capture in every micro-batch (hidden-state
    /// hand-off), or `None` for a context that produces logits.
    pub capture: Option<String>,
}

/// An owned, loaded `llama_model`.
pub struct RawModel {
    ptr: NonNull<sys::llama_model>,
}

// SAFETY: a loaded llama_model is read-only; llama.cpp supports using one
// model from several contexts on several threads.
unsafe impl Send for RawModel {}
// SAFETY: see above; no method mutates the model.
unsafe impl Sync for RawModel {}

impl RawModel {
    /// Loads a GGUF with llama.cpp. `n_gpu_layers` < 0 offloads every layer
    /// that a GPU backend can take (none on a CPU build).
    pub fn load(path: &Path, n_gpu_layers: i32) -> Result<Self, FfiError> {
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| FfiError::Nul)?;
        // SAFETY: default params are plain data; the path is a valid C string
        // that outlives the call.
        let ptr = unsafe {
            let mut params = sys::llama_model_default_params();
            params.n_gpu_layers = n_gpu_layers;
            sys::llama_model_load_from_file(cpath.as_ptr(), params)
        };
        NonNull::new(ptr)
            .map(|ptr| Self { ptr })
            .ok_or_else(|| FfiError::LoadModel {
                path: path.display().to_string(),
            })
    }

    /// Width of the hidden state.
    pub fn n_embd(&self) -> u32 {
        // SAFETY: valid model pointer (type invariant).
        let n = unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    /// Number of transformer blocks in this file.
    pub fn n_layer(&self) -> u32 {
        // SAFETY: valid model pointer.
        let n = unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    /// Number of tokens in the vocabulary (1 for a slice without vocab).
    pub fn n_vocab(&self) -> u32 {
        // SAFETY: valid model pointer; the vocab lives as long as the model.
        let n = unsafe { sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(self.ptr.as_ptr())) };
        u32::try_from(n).unwrap_or(0)
    }
}

impl Drop for RawModel {
    fn drop(&mut self) {
        // SAFETY: we own the pointer; contexts hold an Arc so none outlive it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// State shared with the eval callback: which tensor to copy and where.
struct Capture {
    target: CString,
    out: Vec<f32>,
    error: Option<String>,
}

/// `ggml_backend_sched_eval_callback`: with `ask`, says whether we want the
/// tensor; without, copies it (F32, contiguous) into [`Capture::out`].
unsafe extern "C" fn capture_cb(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    if t.is_null() || user.is_null() {
        return !ask;
    }
    // SAFETY: `user` is the boxed Capture owned by the RawContext that is
    // inside llama_decode right now (see module invariants); `t` is a live
    // tensor for the duration of the callback.
    let cap = unsafe { &mut *user.cast::<Capture>() };
    let name = unsafe { CStr::from_ptr(sys::ggml_get_name(t)) };
    if ask {
        return name == cap.target.as_c_str();
    }
    if name != cap.target.as_c_str() {
        return true;
    }
    // SAFETY: `t` is valid; we only read its header and copy its data into a
    // buffer of exactly nbytes.
    unsafe {
        let tensor = &*t;
        if tensor.type_ != sys::GGML_TYPE_F32 || !sys::ggml_is_contiguous(t) {
            cap.error = Some(format!(
                "tensor {:?} is not contiguous F32 (type {})",
                name, tensor.type_
            ));
            return true;
        }
        let nbytes = sys::ggml_nbytes(t);
        let n = nbytes / std::mem::size_of::<f32>();
        let start = cap.out.len();
        cap.out.resize(start + n, 0.0);
        sys::ggml_backend_tensor_get(
            t,
            cap.out.as_mut_ptr().add(start).cast::<c_void>(),
            0,
            nbytes,
        );
    }
    // Stop here: what follows `l_out` in a non-last range (final norm and a
    // one-row head) is never read, and skipping it saves a graph piece.
    false
}

/// An owned `llama_context` with an optional hidden-state capture.
pub struct RawContext {
    // Field order matters: the context is dropped (in Drop) before the
    // capture box and the model Arc are released.
    ptr: NonNull<sys::llama_context>,
    capture: Option<Box<Capture>>,
    _model: Arc<RawModel>,
}

// SAFETY: a llama_context may move between threads as long as one thread
// uses it at a time, which `&mut self` on every call enforces.
unsafe impl Send for RawContext {}

impl RawContext {
    /// Creates a context with `n_seq` independent sequences of `n_ctx_seq`
    /// tokens each (non-unified KV, so sequences never share cells).
    pub fn new(model: Arc<RawModel>, p: &ContextParams) -> Result<Self, FfiError> {
        let mut capture = match &p.capture {
            Some(name) => Some(Box::new(Capture {
                target: CString::new(name.as_bytes()).map_err(|_| FfiError::Nul)?,
                out: Vec::new(),
                error: None,
            })),
            None => None,
        };
        let n_ctx = p.n_ctx_seq.saturating_mul(p.n_seq);
        // SAFETY: default params are plain data; the model pointer is valid
        // (kept alive by the Arc stored in the result); the capture box
        // outlives the context (see Drop).
        let ptr = unsafe {
            let mut c = sys::llama_context_default_params();
            c.n_ctx = n_ctx;
            c.n_batch = p.n_batch;
            c.n_ubatch = p.n_ubatch;
            c.n_seq_max = p.n_seq;
            c.n_threads = p.n_threads;
            c.n_threads_batch = p.n_threads;
            c.kv_unified = false;
            c.no_perf = true;
            if let Some(cap) = capture.as_mut() {
                c.cb_eval = Some(capture_cb);
                c.cb_eval_user_data = (&mut **cap as *mut Capture).cast::<c_void>();
            }
            sys::llama_init_from_model(model.ptr.as_ptr(), c)
        };
        let ptr = NonNull::new(ptr).ok_or(FfiError::NewContext {
            n_ctx,
            n_seq: p.n_seq,
        })?;
        Ok(Self {
            ptr,
            capture,
            _model: model,
        })
    }

    /// Tokens per sequence as llama.cpp settled it (padded up to 256).
    pub fn n_ctx_seq(&self) -> u32 {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ctx_seq(self.ptr.as_ptr()) }
    }

    /// Changes the thread count for later decodes.
    pub fn set_threads(&mut self, n: i32) {
        // SAFETY: valid context.
        unsafe { sys::llama_set_n_threads(self.ptr.as_ptr(), n, n) }
    }

    /// Runs `batch`; returns the captured hidden states (n_tokens × n_embd,
    /// in batch order) when this context captures, else an empty vector.
    pub fn decode(&mut self, batch: &RawBatch) -> Result<Vec<f32>, FfiError> {
        if let Some(cap) = self.capture.as_mut() {
            cap.out.clear();
            cap.error = None;
        }
        // SAFETY: valid context; the batch was filled within its capacity and
        // `n_tokens` set accordingly (RawBatch invariant).
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw) };
        if rc != 0 {
            return Err(FfiError::Decode(rc));
        }
        match self.capture.as_mut() {
            Some(cap) => {
                if let Some(e) = cap.error.take() {
                    return Err(FfiError::Capture(e));
                }
                Ok(std::mem::take(&mut cap.out))
            }
            None => Ok(Vec::new()),
        }
    }

    /// Logits of output row `i` of the last decode (`-1`: the last row).
    pub fn logits(&mut self, i: i32, n_vocab: usize) -> Result<Vec<f32>, FfiError> {
        // SAFETY: valid context; llama.cpp returns null for rows it has no
        // logits for, else a pointer to n_vocab floats owned by the context.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), i);
            if p.is_null() {
                return Err(FfiError::NoLogits(i));
            }
            Ok(std::slice::from_raw_parts(p, n_vocab).to_vec())
        }
    }

    /// Removes positions `[p0, ∞)` of sequence `seq` from the KV cache.
    pub fn seq_rm(&mut self, seq: i32, p0: i32) -> bool {
        // SAFETY: valid context; the memory handle belongs to it.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr.as_ptr()), seq, p0, -1) }
    }
}

impl Drop for RawContext {
    fn drop(&mut self) {
        // SAFETY: we own the context; the capture box and the model are still
        // alive here (fields drop after this body).
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// What a batch carries per token.
pub enum BatchInput<'a> {
    /// Token ids.
    Tokens(&'a [i32]),
    /// Row-major hidden states, `n_embd` floats per token.
    Embd { data: &'a [f32], n_embd: usize },
}

/// An owned `llama_batch` for one sequence.
pub struct RawBatch {
    raw: sys::llama_batch,
}

impl RawBatch {
    /// Builds a batch for sequence `seq` starting at position `pos0`. Rows
    /// whose index is in `outputs` (all when `all_outputs`) request output.
    pub fn new(input: BatchInput<'_>, seq: i32, pos0: i32, all_outputs: bool) -> Option<Self> {
        let (n, embd) = match &input {
            BatchInput::Tokens(t) => (t.len(), 0usize),
            BatchInput::Embd { data, n_embd } => {
                if *n_embd == 0 || data.len() % n_embd != 0 {
                    return None;
                }
                (data.len() / n_embd, *n_embd)
            }
        };
        let n_i32 = i32::try_from(n).ok()?;
        let embd_i32 = i32::try_from(embd).ok()?;
        if n == 0 {
            return None;
        }
        // SAFETY: llama_batch_init allocates every array for n tokens (embd
        // for n*embd floats when embd > 0, else token) and 1 seq id each; we
        // write exactly those ranges below and free the batch in Drop.
        unsafe {
            let mut raw = sys::llama_batch_init(n_i32, embd_i32, 1);
            match input {
                BatchInput::Tokens(t) => {
                    std::ptr::copy_nonoverlapping(t.as_ptr(), raw.token, n);
                }
                BatchInput::Embd { data, .. } => {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), raw.embd, n * embd);
                }
            }
            for i in 0..n {
                *raw.pos.add(i) = pos0 + i as i32;
                *raw.n_seq_id.add(i) = 1;
                *(*raw.seq_id.add(i)) = seq;
                *raw.logits.add(i) = i8::from(all_outputs || i + 1 == n);
            }
            raw.n_tokens = n_i32;
            Some(Self { raw })
        }
    }
}

impl Drop for RawBatch {
    fn drop(&mut self) {
        // SAFETY: allocated by llama_batch_init, freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

/// Converts `n` elements of ggml type `ty` at `src` to f32 with ggml's own
/// `to_float` (bit-exact with the in-graph `get_rows`).
pub fn ggml_to_f32(ty: u32, src: &[u8], n_elems: usize) -> Result<Vec<f32>, FfiError> {
    let row = row_size(ty, n_elems)?;
    if src.len() != row {
        return Err(FfiError::NoToFloat(ty));
    }
    let mut out = vec![0f32; n_elems];
    // SAFETY: ggml_get_type_traits returns a static table entry for valid
    // types (checked by row_size); to_float reads row_size(ty, n) bytes,
    // which `src` holds, and writes n floats into `out`.
    unsafe {
        let traits = sys::ggml_get_type_traits(ty as sys::ggml_type);
        if traits.is_null() {
            return Err(FfiError::NoToFloat(ty));
        }
        if ty == sys::GGML_TYPE_F32 {
            std::ptr::copy_nonoverlapping(src.as_ptr(), out.as_mut_ptr().cast::<u8>(), src.len());
            return Ok(out);
        }
        let f = (*traits).to_float.ok_or(FfiError::NoToFloat(ty))?;
        f(
            src.as_ptr().cast::<c_void>(),
            out.as_mut_ptr(),
            n_elems as i64,
        );
    }
    Ok(out)
}

/// Bytes of one row of `n` elements of ggml type `ty`.
pub fn row_size(ty: u32, n: usize) -> Result<usize, FfiError> {
    if ty >= sys::GGML_TYPE_COUNT {
        return Err(FfiError::NoToFloat(ty));
    }
    // SAFETY: ty is a valid ggml_type (checked above); pure function.
    let bs = unsafe { sys::ggml_blck_size(ty as sys::ggml_type) };
    if bs <= 0 || n as i64 % bs != 0 {
        return Err(FfiError::NoToFloat(ty));
    }
    // SAFETY: as above.
    Ok(unsafe { sys::ggml_row_size(ty as sys::ggml_type, n as i64) })
}

/// Sampler parameters (llama.cpp's sampler chain).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSpec {
    /// 0 or less: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: i32,
    /// 1.0: off.
    pub top_p: f32,
    /// Seed of the random draw.
    pub seed: u32,
}

/// An owned llama.cpp sampler chain.
pub struct RawSampler {
    ptr: NonNull<sys::llama_sampler>,
}

// SAFETY: a sampler chain is plain state used by one thread at a time.
unsafe impl Send for RawSampler {}

impl RawSampler {
    /// Greedy when `temperature <= 0`, else top-k → top-p → temperature →
    /// seeded draw (llama.cpp's usual order).
    pub fn new(spec: &SamplerSpec) -> Option<Self> {
        // SAFETY: the chain takes ownership of every sampler added to it and
        // frees them with itself.
        unsafe {
            let chain = sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params());
            let chain = NonNull::new(chain)?;
            let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain.as_ptr(), s);
            if spec.temperature <= 0.0 {
                add(sys::llama_sampler_init_greedy());
            } else {
                if spec.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(spec.top_k));
                }
                if spec.top_p < 1.0 {
                    add(sys::llama_sampler_init_top_p(spec.top_p, 1));
                }
                add(sys::llama_sampler_init_temp(spec.temperature));
                add(sys::llama_sampler_init_dist(spec.seed));
            }
            Some(Self { ptr: chain })
        }
    }

    /// Picks a token from a row of logits and records it in the chain.
    pub fn sample(&mut self, logits: &[f32]) -> Option<i32> {
        let mut data: Vec<sys::llama_token_data> = logits
            .iter()
            .enumerate()
            .map(|(i, &logit)| sys::llama_token_data {
                id: i as i32,
                logit,
                p: 0.0,
            })
            .collect();
        let mut arr = sys::llama_token_data_array {
            data: data.as_mut_ptr(),
            size: data.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: `arr` points into `data`, which outlives both calls;
        // samplers may shrink `size` or re-point `data` within the array.
        unsafe {
            sys::llama_sampler_apply(self.ptr.as_ptr(), &mut arr);
            let sel = usize::try_from(arr.selected).ok()?;
            if sel >= arr.size || arr.data.is_null() {
                return None;
            }
            let token = (*arr.data.add(sel)).id;
            sys::llama_sampler_accept(self.ptr.as_ptr(), token);
            Some(token)
        }
    }
}

impl Drop for RawSampler {
    fn drop(&mut self) {
        // SAFETY: owned chain, freed once (frees its members too).
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) }
    }
}

/// llama.cpp's system info line (SIMD features, backends).
pub fn system_info() -> String {
    // SAFETY: returns a static NUL-terminated string.
    unsafe {
        let p: *const c_char = sys::llama_print_system_info();
        if p.is_null() {
            return String::new();
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
