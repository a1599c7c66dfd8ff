//! A loaded range served to async code: one OS thread owns the
//! [`SliceEngine`] (llama.cpp contexts are used by one thread at a time) and
//! runs jobs from a queue; callers hold a cheap, cloneable
//! [`EngineService`] and await replies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::oneshot;

use super::{EngineError, Layout, SessionId, SliceEngine, StepInput, StepOutput};

/// Owned input of one step (see [`StepInput`]).
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedInput {
    /// Token ids (first range).
    Tokens(Vec<i32>),
    /// Hidden states, row-major.
    Hidden(Vec<f32>),
}

enum Job {
    Open(oneshot::Sender<Result<SessionId, EngineError>>),
    Forward(
        SessionId,
        OwnedInput,
        Shape,
        oneshot::Sender<Result<(StepOutput, Picked), EngineError>>,
    ),
    Truncate(SessionId, u32, oneshot::Sender<Result<(), EngineError>>),
    Close(SessionId, oneshot::Sender<Result<(), EngineError>>),
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

/// When the engine thread picked a forward job up and finished it
/// (microseconds since the Unix epoch, [`crate::trace::now_us`]): the
/// step trace's `picked` and `computed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Picked {
    /// Job taken off the queue.
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
    /// The engine thread is gone (the process is shutting down).
    #[error("the engine has stopped")]
    Stopped,
}

/// Cloneable handle to a range running on its own thread.
#[derive(Clone)]
pub struct EngineService {
    tx: mpsc::Sender<Job>,
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
    /// Moves the engine onto its own thread.
    pub fn spawn(mut engine: SliceEngine) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let free = Arc::new(AtomicUsize::new(engine.free_sessions()));
        let svc = Self {
            tx,
            layout: engine.layout(),
            n_vocab: engine.n_vocab(),
            ctx_per_session: engine.ctx_per_session(),
            max_sessions: engine.free_sessions() + engine.open_sessions(),
            free: free.clone(),
        };
        let name = format!("engine-{}-{}", svc.layout.start, svc.layout.end);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            while let Ok(job) = rx.recv() {
                match job {
                    Job::Open(r) => {
                        let opened = engine.open_session();
                        free.store(engine.free_sessions(), Ordering::Relaxed);
                        let _ = r.send(opened);
                    }
                    Job::Forward(id, input, shape, r) => {
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
                        let _ = r.send(out.map(|o| (o, Picked { at, done })));
                    }
                    Job::Truncate(id, pos, r) => {
                        let _ = r.send(engine.truncate(id, pos));
                    }
                    Job::Close(id, r) => {
                        // The count first: whoever hears the close may
                        // look for the slot at once.
                        let closed = engine.close_session(id);
                        free.store(engine.free_sessions(), Ordering::Relaxed);
                        let _ = r.send(closed);
                    }
                }
                free.store(engine.free_sessions(), Ordering::Relaxed);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the engine thread: {e}");
        }
        svc
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Job,
    ) -> Result<T, ServiceError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| ServiceError::Stopped)?;
        Ok(rx.await.map_err(|_| ServiceError::Stopped)??)
    }

    /// Opens a session with an empty KV cache ([`EngineError::Busy`] when
    /// every slot is taken).
    pub async fn open(&self) -> Result<SessionId, ServiceError> {
        self.call(Job::Open).await
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
    /// thread picked the job up and finished it.
    pub async fn forward_timed(
        &self,
        id: SessionId,
        input: OwnedInput,
        shape: Shape,
    ) -> Result<(StepOutput, Picked), ServiceError> {
        self.call(|r| Job::Forward(id, input, shape, r)).await
    }

    /// Drops positions `pos..` of a session.
    pub async fn truncate(&self, id: SessionId, pos: u32) -> Result<(), ServiceError> {
        self.call(|r| Job::Truncate(id, pos, r)).await
    }

    /// Closes a session and frees its slot and KV cache.
    pub async fn close(&self, id: SessionId) -> Result<(), ServiceError> {
        self.call(|r| Job::Close(id, r)).await
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
