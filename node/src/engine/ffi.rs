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
//! * The eval-callback state ([`Capture`]) is leaked from a `Box` into a
//!   raw pointer whose copy is handed to llama.cpp as `cb_eval_user_data`.
//!   Rust only ever reaches it through that same pointer (never through a
//!   `Box` or a long-lived reference that could invalidate llama.cpp's
//!   copy), with short-lived `&mut` taken only while llama.cpp is not
//!   inside `llama_decode`; it is freed with `Box::from_raw` after
//!   `llama_free`. llama.cpp only touches it inside `llama_decode`, which
//!   we call with `&mut self`, so no other reference exists while the
//!   callback runs.
//! * [`RawBatch`] owns the per-token arrays of a batch as Rust `Vec`s whose
//!   allocation is checked (`try_reserve_exact`), fully initialised and
//!   never changed after construction; it lends llama.cpp a `llama_batch`
//!   view of them, which llama.cpp only reads.
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
        /// The GGUF that `llama_model_load_from_file` refused (llama.cpp
        /// logs the reason through `tracing`).
        path: String,
    },
    /// No backend device has this index.
    #[error("no backend device {index}")]
    NoDevice {
        /// The index asked for (`ggml_backend_dev_get`'s order).
        index: usize,
    },
    /// llama.cpp refused to create a context.
    #[error("llama.cpp could not create a context (n_ctx {n_ctx}, sessions {n_seq})")]
    NewContext {
        /// Total context asked for, in tokens over all sequences
        /// (`n_ctx_seq × n_seq`, saturating).
        n_ctx: u32,
        /// Number of independent sequences (sessions) asked for.
        n_seq: u32,
    },
    /// `llama_decode` returned this non-zero code (1: no KV slot for the
    /// batch, 2: aborted, -1: invalid batch, < -1: fatal).
    #[error("llama_decode failed with code {0}")]
    Decode(i32),
    /// The eval callback saw the capture tensor in a form it cannot copy
    /// (not contiguous F32), or the engine got a capture of the wrong size;
    /// the message says which.
    #[error("hidden-state capture failed: {0}")]
    Capture(String),
    /// A path or tensor name had an interior NUL byte, so it cannot be
    /// passed to C.
    #[error("string contains a NUL byte")]
    Nul,
    /// llama.cpp returned no logits for this output row (`-1`: the last
    /// one), e.g. because the last decode did not request it.
    #[error("no logits for output row {0}")]
    NoLogits(i32),
    /// This ggml type id is unknown, has no `to_float`, or does not fit the
    /// requested element count and byte length.
    #[error("ggml type {0} cannot be converted to f32")]
    NoToFloat(u32),
}

/// Parameters for a context; see [`RawContext::new`].
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// KV cache size of each sequence, in tokens (llama.cpp may pad it up;
    /// see [`RawContext::n_ctx_seq`]).
    pub n_ctx_seq: u32,
    /// Number of independent sequences (sessions), each with its own
    /// `n_ctx_seq` tokens of KV cache.
    pub n_seq: u32,
    /// Logical batch: the most tokens one `llama_decode` may take.
    pub n_batch: u32,
    /// Physical micro-batch: llama.cpp splits a decode into graphs of at
    /// most this many tokens (the eval callback runs once per micro-batch).
    pub n_ubatch: u32,
    /// CPU threads used both for single-token decodes and for prefill
    /// batches.
    pub n_threads: i32,
    /// Name of the tensor to capture in every micro-batch (hidden-state
    /// hand-off), or `None` for a context that produces logits.
    pub capture: Option<String>,
}

/// An owned, loaded `llama_model`.
pub struct RawModel {
    ptr: NonNull<sys::llama_model>,
}

// SAFETY: a `llama_model` has no thread affinity: it is plain heap state
// plus backend buffers, and freeing it from another thread than the one that
// loaded it is fine (llama-cpp-2's `LlamaModel` is `Send` for the same
// reason).
unsafe impl Send for RawModel {}
// SAFETY: after `llama_model_load_from_file` returns, llama.cpp never writes
// to the model: every function we call on it (`llama_model_n_*`,
// `llama_model_get_vocab`, `llama_vocab_n_tokens`, `llama_init_from_model`)
// takes it as read-only, and llama.cpp documents sharing one model between
// several contexts used on several threads. `&RawModel` exposes nothing
// else.
unsafe impl Sync for RawModel {}

impl RawModel {
    /// Loads a GGUF with llama.cpp. `n_gpu_layers` < 0 offloads every layer
    /// that a GPU backend can take (none on a CPU build). `device`: the
    /// index (in `ggml_backend_dev_get`'s order, as
    /// [`super::devices`] lists them) of the one GPU to offload to;
    /// `None`: llama.cpp's choice (every GPU, layers split between them).
    /// A CPU device means no offload.
    pub fn load(path: &Path, n_gpu_layers: i32, device: Option<usize>) -> Result<Self, FfiError> {
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| FfiError::Nul)?;
        let mut devices: [sys::ggml_backend_dev_t; 2] = [std::ptr::null_mut(); 2];
        let mut n_gpu_layers = n_gpu_layers;
        if let Some(i) = device {
            // SAFETY: `ggml_backend_dev_count` and `ggml_backend_dev_get`
            // only read the registry of backends, built once by
            // `init_backend` (the engine initialises the backend before it
            // loads a model); an index past the count is refused before
            // `ggml_backend_dev_get` sees it, and the device it returns
            // lives as long as the process.
            let dev = unsafe {
                if i >= sys::ggml_backend_dev_count() {
                    return Err(FfiError::NoDevice { index: i });
                }
                sys::ggml_backend_dev_get(i)
            };
            if dev.is_null() {
                return Err(FfiError::NoDevice { index: i });
            }
            // SAFETY: `dev` is a live device of the registry (above).
            let kind = unsafe { sys::ggml_backend_dev_type(dev) };
            if kind == sys::GGML_BACKEND_DEVICE_TYPE_CPU
                || kind == sys::GGML_BACKEND_DEVICE_TYPE_ACCEL
            {
                n_gpu_layers = 0;
            } else {
                devices[0] = dev;
            }
        }
        // SAFETY: `llama_model_default_params` takes nothing and returns a
        // plain struct by value (its pointer fields are null or static).
        // `cpath` is a NUL-terminated string and `devices` a null-terminated
        // list of registry devices, both living until the end of this
        // function; llama.cpp only reads them during the call (it copies
        // the device list into the model) and does not keep them. A failed
        // load returns null, checked below.
        let ptr = unsafe {
            let mut params = sys::llama_model_default_params();
            params.n_gpu_layers = n_gpu_layers;
            if !devices[0].is_null() {
                params.devices = devices.as_mut_ptr();
            }
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
        // SAFETY: `self.ptr` is a live model (non-null from load, freed only
        // in Drop); the call only reads its hyper-parameters.
        let n = unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    /// Number of transformer blocks in this file.
    pub fn n_layer(&self) -> u32 {
        // SAFETY: `self.ptr` is a live model (non-null from load, freed only
        // in Drop); the call only reads its hyper-parameters.
        let n = unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()) };
        u32::try_from(n).unwrap_or(0)
    }

    /// Number of tokens in the vocabulary (1 for a slice without vocab).
    pub fn n_vocab(&self) -> u32 {
        // SAFETY: `self.ptr` is a live model; `llama_model_get_vocab`
        // returns a pointer to the vocabulary embedded in the model (never
        // null, lives as long as the model), which `llama_vocab_n_tokens`
        // only reads before we return.
        let n = unsafe { sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(self.ptr.as_ptr())) };
        u32::try_from(n).unwrap_or(0)
    }
}

impl Drop for RawModel {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from `llama_model_load_from_file`, is owned
        // by this value alone and is freed only here, once. Every context
        // made from it holds an `Arc<RawModel>`, so this runs after the last
        // context has been freed.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// State shared with the eval callback: which tensor to copy and where.
struct Capture {
    /// Name of the graph tensor to copy (`l_out-<last layer>`).
    target: CString,
    /// Rows captured during the current `llama_decode`, appended once per
    /// micro-batch in batch order; cleared before each decode.
    out: Vec<f32>,
    /// Why the capture failed during the current decode, if it did.
    error: Option<String>,
}

/// `ggml_backend_sched_eval_callback`: with `ask`, says whether we want the
/// tensor; without, copies it (F32, contiguous) into [`Capture::out`].
///
/// # Safety
///
/// Only llama.cpp calls this, as the `cb_eval` of a context made by
/// [`RawContext::new`], synchronously on the thread inside `llama_decode`.
/// `t` must be null or a tensor of the graph being computed (allocated and,
/// when `ask` is false, computed), and `user` null or the `Capture` given as
/// `cb_eval_user_data`, with no other reference to it live during the call.
unsafe extern "C" fn capture_cb(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    if t.is_null() || user.is_null() {
        return !ask;
    }
    // SAFETY: `user` is the `cb_eval_user_data` that `RawContext::new` set:
    // a copy of its `Capture` pointer (from `Box::leak`), which stays valid
    // until after the context is freed. Rust only ever accesses the
    // `Capture` through that same pointer, so this copy is not invalidated.
    // llama.cpp only calls back from inside `llama_decode`, which
    // `RawContext::decode` calls holding `&mut self` and with no reference
    // to the `Capture` live during the call, so this is the only reference
    // to it while it lives (it ends when the callback returns).
    let cap = unsafe { &mut *user.cast::<Capture>() };
    // SAFETY: `t` is a non-null graph tensor (checked above) that ggml keeps
    // alive during the callback. `ggml_get_name` returns a pointer to its
    // fixed-size `name` array, which ggml always NUL-terminates; `name`
    // borrows it only within this call.
    let name = unsafe { CStr::from_ptr(sys::ggml_get_name(t)) };
    if ask {
        return name == cap.target.as_c_str();
    }
    if name != cap.target.as_c_str() {
        return true;
    }
    // SAFETY: `t` is a live tensor that nothing writes while the callback
    // runs, so reading its header through `&*t` is fine. With `ask` false
    // the scheduler has computed it, so its backend buffer is set, as
    // `ggml_backend_tensor_get` requires. We copy only once it is contiguous
    // F32, so `ggml_nbytes(t)` is exactly `n` f32s; `cap.out` was just grown
    // by `n` elements, so the destination `out[start..start + n]` holds
    // `nbytes` bytes, and the source range `0..nbytes` is the whole tensor.
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
    /// The context; non-null, owned, freed once in Drop.
    ptr: NonNull<sys::llama_context>,
    /// The eval callback's state, from `Box::into_raw` (via `Box::leak`);
    /// llama.cpp holds a copy of this pointer as `cb_eval_user_data`.
    /// Owned by this value alone, only accessed through this pointer and
    /// freed with `Box::from_raw` in Drop, after `llama_free`. `None` for a
    /// context that produces logits.
    capture: Option<NonNull<Capture>>,
    /// Floats in one row of logits: the model's `llama_vocab_n_tokens`,
    /// which is the row stride llama.cpp uses in its logits buffer.
    n_vocab: usize,
    /// Keeps the model alive for as long as the context uses it.
    _model: Arc<RawModel>,
}

// SAFETY: a `llama_context` keeps no state tied to the thread that created
// it (its thread pools and backend streams are owned by the context and
// serve whichever thread calls in), so it may be used and freed on another
// thread than the one that created it as long as calls never overlap. Every
// method that calls llama.cpp takes `&mut self`, and `RawContext` is not
// `Sync`, so calls never overlap. The `Capture` it owns through a raw
// pointer (a `CString`, a `Vec<f32>` and an `Option<String>`) and the model
// `Arc` that travel with it are `Send` too.
unsafe impl Send for RawContext {}

impl RawContext {
    /// Creates a context with `n_seq` independent sequences of `n_ctx_seq`
    /// tokens each (non-unified KV, so sequences never share cells).
    pub fn new(model: Arc<RawModel>, p: &ContextParams) -> Result<Self, FfiError> {
        let target = match &p.capture {
            Some(name) => Some(CString::new(name.as_bytes()).map_err(|_| FfiError::Nul)?),
            None => None,
        };
        // Nothing fallible runs between leaking the box and either handing
        // it to the result or freeing it below.
        let capture = target.map(|target| {
            NonNull::from(Box::leak(Box::new(Capture {
                target,
                out: Vec::new(),
                error: None,
            })))
        });
        let n_vocab = model.n_vocab() as usize;
        let n_ctx = p.n_ctx_seq.saturating_mul(p.n_seq);
        // SAFETY: `llama_context_default_params` returns a plain struct by
        // value. `model.ptr` is a live model, and the `Arc` moved into the
        // result keeps it alive until after the context is freed (Drop).
        // `capture_cb` matches `ggml_backend_sched_eval_callback`, and its
        // user data is the leaked `Capture` pointer, which the result owns
        // and frees only after `llama_free` (Drop), so llama.cpp never calls
        // back with a dangling pointer; `llama_init_from_model` does not
        // call back itself. A failed init returns null, checked below.
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
            if let Some(cap) = capture {
                c.cb_eval = Some(capture_cb);
                c.cb_eval_user_data = cap.as_ptr().cast::<c_void>();
            }
            sys::llama_init_from_model(model.ptr.as_ptr(), c)
        };
        let Some(ptr) = NonNull::new(ptr) else {
            if let Some(cap) = capture {
                // SAFETY: `cap` came from `Box::leak` above and nothing else
                // owns it: the init failed, so no context holds the pointer
                // as its user data, and it is freed only here, once.
                drop(unsafe { Box::from_raw(cap.as_ptr()) });
            }
            return Err(FfiError::NewContext {
                n_ctx,
                n_seq: p.n_seq,
            });
        };
        Ok(Self {
            ptr,
            capture,
            n_vocab,
            _model: model,
        })
    }

    /// Tokens per sequence as llama.cpp settled it (padded up to 256).
    pub fn n_ctx_seq(&self) -> u32 {
        // SAFETY: `self.ptr` is a live context (non-null from
        // `llama_init_from_model`, freed only in Drop); the call only reads
        // its parameters.
        unsafe { sys::llama_n_ctx_seq(self.ptr.as_ptr()) }
    }

    /// Changes the thread counts for later decodes: `single` for
    /// one-token decodes, `batch` for decodes of several tokens.
    pub fn set_threads(&mut self, single: i32, batch: i32) {
        // SAFETY: `self.ptr` is a live context and `&mut self` means no
        // other call on it is in progress. llama.cpp only stores the counts
        // for later decodes (the engine passes at least 1).
        unsafe { sys::llama_set_n_threads(self.ptr.as_ptr(), single, batch) }
    }

    /// Runs `batch`; returns the captured hidden states (n_tokens × n_embd,
    /// in batch order) when this context captures, else an empty vector.
    pub fn decode(&mut self, batch: &RawBatch) -> Result<Vec<f32>, FfiError> {
        if let Some(cap) = self.capture {
            // SAFETY: `cap` points to the live `Capture` this context owns
            // (freed only in Drop). llama.cpp is not inside `llama_decode`
            // (`&mut self`: no call on the context is in progress), so it is
            // not using its copy of the pointer, and this `&mut`, derived
            // from the same pointer, ends before `llama_decode` below.
            let cap = unsafe { &mut *cap.as_ptr() };
            cap.out.clear();
            cap.error = None;
        }
        // SAFETY: `self.ptr` is a live context and `&mut self` means no other
        // call on it is in progress (and no reference to the `Capture` is
        // live while the callback uses it). `batch.raw()` points into
        // `batch`'s arrays, which are borrowed for the whole call, never
        // written, and hold `n_tokens` initialised entries of `token` or
        // `embd` (the other one null), `pos`, `n_seq_id`, `seq_id` (each
        // pointing to one id) and `logits` (RawBatch invariant); llama.cpp
        // only reads them. llama.cpp validates token ids against the
        // vocabulary, sequence ids against `n_seq_max` and positions against
        // the KV cache, and returns an error code for bad ones. What it
        // cannot check is the width of `embd` rows: it reads `n_embd` of the
        // model floats per token, so an embedding batch must be built with
        // the model's `n_embd` (the engine passes `layout.n_embd`, which is
        // `RawModel::n_embd`).
        let rc = unsafe { sys::llama_decode(self.ptr.as_ptr(), batch.raw()) };
        if rc != 0 {
            return Err(FfiError::Decode(rc));
        }
        match self.capture {
            Some(cap) => {
                // SAFETY: as above: `cap` is the live `Capture` this context
                // owns, `llama_decode` has returned so llama.cpp is not using
                // it, and this `&mut`, derived from the same pointer, ends
                // before this function returns.
                let cap = unsafe { &mut *cap.as_ptr() };
                if let Some(e) = cap.error.take() {
                    return Err(FfiError::Capture(e));
                }
                Ok(std::mem::take(&mut cap.out))
            }
            None => Ok(Vec::new()),
        }
    }

    /// Logits of output row `i` of the last decode (`-1`: the last row):
    /// one float per vocabulary entry.
    pub fn logits(&mut self, i: i32) -> Result<Vec<f32>, FfiError> {
        // SAFETY: `self.ptr` is a live context and `&mut self` means no other
        // call on it is in progress. `llama_get_logits_ith` returns null for
        // a row it has no logits for (checked), else a pointer into the
        // context's (sampled or plain) logits buffer at the start of a row:
        // both buffers are `n_outputs_max` rows of the model's
        // `vocab.n_tokens()` floats, and the pointer is `row × n_tokens`
        // into one of them. `self.n_vocab` is that same count, read from
        // this context's model with `llama_vocab_n_tokens` when the context
        // was made (0 if it did not fit an `i32`, which reads nothing), so
        // the slice stays within the row. The buffer is not touched until
        // the next decode, which needs `&mut self`, and we copy the row out
        // before returning.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), i);
            if p.is_null() {
                return Err(FfiError::NoLogits(i));
            }
            Ok(std::slice::from_raw_parts(p, self.n_vocab).to_vec())
        }
    }

    /// Logits of the last `rows` output rows of the last decode, row after
    /// row (`rows × n_vocab` floats, the earliest position first).
    pub fn logits_rows(&mut self, rows: usize) -> Result<Vec<f32>, FfiError> {
        let mut out = Vec::with_capacity(rows.saturating_mul(self.n_vocab));
        for k in (1..=rows).rev() {
            // `-k`: the k-th output row from the end (llama.cpp counts
            // negative indices back from the last output).
            let i = i32::try_from(k).map_err(|_| FfiError::NoLogits(i32::MIN))?;
            out.extend_from_slice(&self.logits(-i)?);
        }
        Ok(out)
    }

    /// Removes positions `[p0, ∞)` of sequence `seq` from the KV cache.
    pub fn seq_rm(&mut self, seq: i32, p0: i32) -> bool {
        // SAFETY: `self.ptr` is a live context and `&mut self` means no other
        // call on it is in progress. `llama_get_memory` returns its KV cache
        // (owned by the context), used only for this call. A negative `p0`
        // is clamped to 0; a `seq` outside `0..n_seq_max` would abort the
        // process in a `GGML_ASSERT` (not touch memory), and the engine only
        // passes ids it took from `0..n_seq`.
        unsafe { sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr.as_ptr()), seq, p0, -1) }
    }
}

impl Drop for RawContext {
    fn drop(&mut self) {
        // SAFETY: `self.ptr` came from `llama_init_from_model`, is owned by
        // this value alone and is freed only here, once. The `Capture` (the
        // callback's user data) is freed just below and the model `Arc` is a
        // field, dropped after this body: both outlive the context.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
        if let Some(cap) = self.capture.take() {
            // SAFETY: `cap` came from `Box::leak` in `RawContext::new`, is
            // owned by this value alone and is freed only here, once (taken
            // out of the field). The context that held a copy of it as
            // `cb_eval_user_data` was freed just above, so nothing uses it
            // any more, and no reference derived from it is live.
            drop(unsafe { Box::from_raw(cap.as_ptr()) });
        }
    }
}

/// What a batch carries per token.
pub enum BatchInput<'a> {
    /// Token ids, one row per token.
    Tokens(&'a [i32]),
    /// Row-major hidden states, `n_embd` floats per token.
    Embd {
        /// `n_tokens × n_embd` floats, token after token.
        data: &'a [f32],
        /// Width of one row; must be the model's `n_embd`, since llama.cpp
        /// reads that many floats per token.
        n_embd: usize,
    },
}

/// The per-token input rows a [`RawBatch`] owns.
enum BatchRows {
    /// `n_tokens` token ids.
    Tokens(Vec<i32>),
    /// `n_tokens × n_embd` floats, token after token.
    Embd(Vec<f32>),
}

/// The arrays of a `llama_batch` for one sequence, owned by Rust.
///
/// Invariant: `n_tokens > 0` and every array holds exactly `n_tokens`
/// initialised entries (`Embd`: `n_tokens × n_embd` floats);
/// `seq_id_ptrs[i]` points to `_seq_ids[i]`. Nothing is changed after
/// [`RawBatch::new`] returns, so the pointers handed out by
/// [`RawBatch::raw`] (and `seq_id_ptrs`, which point into the heap buffer of
/// `_seq_ids`, which does not move when the `Vec` does) stay valid for as
/// long as the batch is borrowed.
pub struct RawBatch {
    /// Token ids or hidden-state rows.
    rows: BatchRows,
    /// Position of each token.
    pos: Vec<i32>,
    /// Number of sequence ids of each token (always 1).
    n_seq_id: Vec<i32>,
    /// The one sequence id of each token; read only by llama.cpp, through
    /// `seq_id_ptrs`.
    _seq_ids: Vec<i32>,
    /// `_seq_ids[i]`'s address for each token, as `llama_batch::seq_id`
    /// wants it; derived from a shared borrow, so never written through.
    seq_id_ptrs: Vec<*mut i32>,
    /// Whether each token's row is output (1) or not (0).
    logits: Vec<i8>,
    /// Number of tokens; fits in `i32`.
    n_tokens: i32,
}

/// A vector with room for exactly `n` elements, or `None` if the allocation
/// fails (instead of aborting the process).
fn try_vec<T>(n: usize) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    Some(v)
}

impl RawBatch {
    /// Builds a batch for sequence `seq` starting at position `pos0`. The
    /// last `outputs` rows request output (all of them when `outputs` is
    /// the row count or more; at least the last row). `None` if the input
    /// is empty, too long or ragged, or an allocation fails.
    pub fn new(input: BatchInput<'_>, seq: i32, pos0: i32, outputs: usize) -> Option<Self> {
        let n = match &input {
            BatchInput::Tokens(t) => t.len(),
            BatchInput::Embd { data, n_embd } => {
                if *n_embd == 0 || data.len() % n_embd != 0 {
                    return None;
                }
                data.len() / n_embd
            }
        };
        let n_tokens = i32::try_from(n).ok()?;
        if n == 0 {
            return None;
        }
        let rows = match input {
            BatchInput::Tokens(t) => {
                let mut v = try_vec(t.len())?;
                v.extend_from_slice(t);
                BatchRows::Tokens(v)
            }
            BatchInput::Embd { data, .. } => {
                let mut v = try_vec(data.len())?;
                v.extend_from_slice(data);
                BatchRows::Embd(v)
            }
        };
        let mut pos = try_vec(n)?;
        pos.extend((0..n_tokens).map(|i| pos0 + i));
        let mut n_seq_id = try_vec(n)?;
        n_seq_id.resize(n, 1);
        let mut seq_ids = try_vec(n)?;
        seq_ids.resize(n, seq);
        let mut seq_id_ptrs = try_vec(n)?;
        seq_id_ptrs.extend(seq_ids.iter().map(|id| std::ptr::from_ref(id).cast_mut()));
        let mut logits = try_vec(n)?;
        let first_output = n.saturating_sub(outputs.max(1));
        logits.extend((0..n).map(|i| i8::from(i >= first_output)));
        Some(Self {
            rows,
            pos,
            n_seq_id,
            _seq_ids: seq_ids,
            seq_id_ptrs,
            logits,
            n_tokens,
        })
    }

    /// A `llama_batch` view of this batch's arrays, valid while `self` is
    /// borrowed. Its pointers are derived from shared borrows: llama.cpp
    /// must only read through them (`llama_decode` does).
    fn raw(&self) -> sys::llama_batch {
        let (token, embd) = match &self.rows {
            BatchRows::Tokens(t) => (t.as_ptr().cast_mut(), std::ptr::null_mut()),
            BatchRows::Embd(e) => (std::ptr::null_mut(), e.as_ptr().cast_mut()),
        };
        sys::llama_batch {
            n_tokens: self.n_tokens,
            token,
            embd,
            pos: self.pos.as_ptr().cast_mut(),
            n_seq_id: self.n_seq_id.as_ptr().cast_mut(),
            seq_id: self.seq_id_ptrs.as_ptr().cast_mut(),
            logits: self.logits.as_ptr().cast_mut(),
        }
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
    // SAFETY: `row_size` succeeded, so `ty < GGML_TYPE_COUNT` (ggml indexes
    // its static type table with it and only `assert`s the bound, which
    // release builds drop) and `n_elems` is a whole number of blocks.
    // `src.len()` is exactly `row_size(ty, n_elems)`, the bytes `to_float`
    // (and the F32 copy) read for `n_elems` elements, and `out` holds
    // `n_elems` f32s, what they write. `src` and the fresh `out` do not
    // overlap, as `copy_nonoverlapping` and `to_float`'s `restrict`
    // parameters need.
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
    // SAFETY: `ggml_blck_size` indexes ggml's static type table, checking
    // the bound only with `assert` (gone in release builds);
    // `ty < GGML_TYPE_COUNT` was checked above, so the index is in bounds.
    // It reads nothing else.
    let bs = unsafe { sys::ggml_blck_size(ty as sys::ggml_type) };
    if bs <= 0 || n as i64 % bs != 0 {
        return Err(FfiError::NoToFloat(ty));
    }
    // SAFETY: `ty < GGML_TYPE_COUNT` (checked above), so the table lookups
    // in `ggml_row_size` are in bounds, and `bs > 0` with `n` a multiple of
    // it, so its division is defined and exact.
    Ok(unsafe { sys::ggml_row_size(ty as sys::ggml_type, n as i64) })
}

/// Sampler parameters (llama.cpp's sampler chain).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSpec {
    /// Softmax temperature; 0 or less means greedy (always the most likely
    /// token, no randomness).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens before drawing; 0 or less:
    /// off.
    pub top_k: i32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability
    /// sums to at least `top_p`; 1.0 or more: off.
    pub top_p: f32,
    /// Seed of the random draw (unused when greedy); the same seed and
    /// logits give the same tokens.
    pub seed: u32,
}

/// An owned llama.cpp sampler chain.
pub struct RawSampler {
    ptr: NonNull<sys::llama_sampler>,
    /// The candidates array, kept between steps: a vocabulary of 49,152
    /// is 590 KB, which a fresh allocation per step would map and fault in
    /// again every time (about 0.2 ms a token at the last hop).
    data: Vec<sys::llama_token_data>,
}

// SAFETY: a sampler chain (and each sampler llama.cpp's built-in
// constructors put in it) is plain heap state with no thread affinity, so
// it may be used and freed on another thread. Every method that calls
// llama.cpp takes `&mut self` and `RawSampler` is not `Sync`, so calls never
// overlap.
unsafe impl Send for RawSampler {}

impl RawSampler {
    /// Greedy when `temperature <= 0`, else top-k → top-p → temperature →
    /// seeded draw (llama.cpp's usual order).
    pub fn new(spec: &SamplerSpec) -> Option<Self> {
        // SAFETY: the `llama_sampler_init_*` constructors take plain values
        // and return new heap samplers. A null chain is checked (and nothing
        // else is allocated yet); `llama_sampler_chain_add` takes ownership
        // of each sampler added, so each is freed exactly once, with the
        // chain, by `llama_sampler_free` in Drop.
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
            Some(Self {
                ptr: chain,
                data: Vec::new(),
            })
        }
    }

    /// Picks a token from a row of logits and records it in the chain.
    pub fn sample(&mut self, logits: &[f32]) -> Option<i32> {
        let data = &mut self.data;
        data.clear();
        data.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &logit)| sys::llama_token_data {
                    id: i as i32,
                    logit,
                    p: 0.0,
                }),
        );
        let mut arr = sys::llama_token_data_array {
            data: data.as_mut_ptr(),
            size: data.len(),
            selected: -1,
            sorted: false,
        };
        // SAFETY: `self.ptr` is a live chain and `&mut self` means no other
        // call on it is in progress. `arr` describes `data`, which lives
        // until the end of this function; the built-in samplers only sort,
        // rewrite or shrink that array in place (`size` never grows) and
        // set `selected`. So reading element `sel` after checking
        // `sel < arr.size` and `arr.data` non-null stays within `data`
        // (`self.data`, not touched again until this call returns).
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
        // SAFETY: `self.ptr` came from `llama_sampler_chain_init`, is owned
        // by this value alone and is freed only here, once; freeing the
        // chain frees the samplers it owns.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) }
    }
}

/// llama.cpp's system info line (SIMD features, backends).
///
/// Must not run on two threads at once (see the SAFETY comment): call it
/// through `engine::system_info`, which calls it at most once per process.
pub fn system_info() -> String {
    // SAFETY: `llama_print_system_info` rebuilds a function-local static
    // `std::string` and returns its `c_str()`: a NUL-terminated string that
    // stays valid until the next call. We copy it out before returning, so
    // the pointer is not used after this call. Two calls at once would race
    // on that static, which is why the only caller, `engine::system_info`,
    // runs this once behind a `OnceLock`.
    unsafe {
        let p: *const c_char = sys::llama_print_system_info();
        if p.is_null() {
            return String::new();
        }
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}
