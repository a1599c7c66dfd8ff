//! A loaded range served to async code: callers hold a cheap, cloneable
//! [`EngineService`] and await its calls.
//!
//! llama.cpp contexts are used by one thread at a time, so the
//! [`SliceEngine`] sits behind a mutex, and a call runs on the calling
//! task's own worker thread inside `tokio::task::block_in_place` (the
//! runtime moves the worker's other tasks elsewhere meanwhile). An
//! earlier design gave the engine a thread of its own fed by a queue:
//! each step then paid a thread wake-up to get there and another to wake
//! the task back, 90-100 µs a hop on this project's chain bench
//! (`docs/speed.md`). On a current-thread runtime (unit tests), where
//! `block_in_place` is not allowed, calls go to `spawn_blocking`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::{EngineError, Layout, SessionId, SliceEngine, StepInput, StepOutput};

/// Owned input of one step (see [`StepInput`]).
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedInput {
    /// Token ids (first range).
    Tokens(Vec<i32>),
    /// Hidden states, row-major.
    Hidden(Vec<f32>),
}

/// What a forward step stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Rows of logits the last range returns (the last positions').
    pub rows: usize,
    /// The step stands for one-token steps (a decode, a speculative
    /// verify, a replay of decoded tokens): its rows must come out as
    /// one-token steps give them ([`SliceEngine::forward_as_singles`]).
    /// `false` for a prefill, computed as the one batch it is.
    pub singles: bool,
}

impl Shape {
    /// A prefill: one batch, the last position's logits.
    pub const PREFILL: Shape = Shape {
        rows: 1,
        singles: false,
    };
}

/// When the engine took a forward job up (its lock held) and finished it
/// (microseconds since the Unix epoch, [`crate::trace::now_us`]): the
/// step trace's `picked` and `computed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Picked {
    /// Engine lock taken.
    pub at: u64,
    /// Forward pass done.
    pub done: u64,
}

/// Errors of the service on top of the engine's own.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The engine refused the job.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine's blocking task could not run (the runtime is shutting
    /// down).
    #[error("the engine has stopped")]
    Stopped,
}

/// Cloneable handle to a loaded range.
#[derive(Clone)]
pub struct EngineService {
    engine: Arc<Mutex<SliceEngine>>,
    layout: Layout,
    n_vocab: usize,
    ctx_per_session: u32,
    max_sessions: usize,
    free: Arc<AtomicUsize>,
}

impl std::fmt::Debug for EngineService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineService")
            .field("layout", &self.layout)
            .field("free", &self.free_sessions())
            .finish()
    }
}

impl EngineService {
    /// Makes the engine callable from async code.
    pub fn new(engine: SliceEngine) -> Self {
        Self {
            layout: engine.layout(),
            n_vocab: engine.n_vocab(),
            ctx_per_session: engine.ctx_per_session(),
            max_sessions: engine.free_sessions() + engine.open_sessions(),
            free: Arc::new(AtomicUsize::new(engine.free_sessions())),
            engine: Arc::new(Mutex::new(engine)),
        }
    }

    /// Runs `f` on the engine (its lock held) without stalling the
    /// runtime: in place on a multi-thread runtime, else on the blocking
    /// pool. The free-slot count is brought up to date afterwards.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SliceEngine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let engine = self.engine.clone();
        let free = self.free.clone();
        let run = move || {
            // A panic inside llama.cpp's Rust wrappers would abort the
            // process (no unwinding through them); a poisoned lock can only
            // come from a panic in our own code around it, after which the
            // engine's state is as its last completed call left it.
            let mut e = engine.lock().unwrap_or_else(PoisonError::into_inner);
            let r = f(&mut e);
            free.store(e.free_sessions(), Ordering::Relaxed);
            r
        };
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let r = if multi {
            tokio::task::block_in_place(run)
        } else {
            tokio::task::spawn_blocking(run)
                .await
                .map_err(|_| ServiceError::Stopped)?
        };
        Ok(r?)
    }

    /// Opens a session with an empty KV cache ([`EngineError::Busy`] when
    /// every slot is taken).
    pub async fn open(&self) -> Result<SessionId, ServiceError> {
        self.call(SliceEngine::open_session).await
    }

    /// Runs one step of a session (one batch; the last position's
    /// logits at the last range).
    pub async fn forward(
        &self,
        id: SessionId,
        input: OwnedInput,
    ) -> Result<StepOutput, ServiceError> {
        Ok(self.forward_timed(id, input, Shape::PREFILL).await?.0)
    }

    /// Runs one step of a session in `shape`, and says when the engine
    /// took the job up and finished it.
    pub async fn forward_timed(
        &self,
        id: SessionId,
        input: OwnedInput,
        shape: Shape,
    ) -> Result<(StepOutput, Picked), ServiceError> {
        self.call(move |engine| {
            let at = crate::trace::now_us();
            let step = match &input {
                OwnedInput::Tokens(t) => StepInput::Tokens(t),
                OwnedInput::Hidden(h) => StepInput::Hidden(h),
            };
            let out = if shape.singles {
                engine.forward_as_singles(id, step, shape.rows)
            } else {
                engine.forward_rows(id, step, shape.rows)
            };
            let done = crate::trace::now_us();
            out.map(|o| (o, Picked { at, done }))
        })
        .await
    }

    /// Drops positions `pos..` of a session.
    pub async fn truncate(&self, id: SessionId, pos: u32) -> Result<(), ServiceError> {
        self.call(move |e| e.truncate(id, pos)).await
    }

    /// Closes a session and frees its slot and KV cache.
    pub async fn close(&self, id: SessionId) -> Result<(), ServiceError> {
        self.call(move |e| e.close_session(id)).await
    }

    /// Where the range sits in the model.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Vocabulary of the logits (last range).
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Most tokens one session may hold
    /// ([`SliceEngine::ctx_per_session`]).
    pub fn ctx_per_session(&self) -> u32 {
        self.ctx_per_session
    }

    /// Sessions the engine can hold at once (open and free slots).
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Session slots free right now.
    pub fn free_sessions(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }
}
