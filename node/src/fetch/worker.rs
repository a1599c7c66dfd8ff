//! One stream to one peer. Requests are pipelined across piece boundaries
//! ([`PIPELINE_DEPTH`] chunks in flight); each piece's bytes go to its own
//! [`PieceWriter`], so the stream never waits for the disk. A stream lost
//! to network trouble is replaced, and the pieces under way continue on
//! the new one from the bytes received. Every byte read is counted on the
//! worker's [`Meter`], which the scheduler's watchdog reads to find
//! streams that stall or crawl. A piece published by another attempt is
//! cancelled here: no more requests for it, and a stream whose answers
//! still due are all for such pieces is dropped at once (a trickling peer
//! does not keep the worker).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use nakshatra_slicer::{Manifest, PieceId};
use nakshatra_swarm::protocol::fetch::{PieceRef, PieceRequest, PieceResponse, PIECE_PROTOCOL};
use nakshatra_swarm::{PeerId, StreamProtocol};
use tokio::sync::{mpsc, oneshot};

use super::scheduler::{AttemptId, Job, Meter, Next, Peek, Scheduler, Verdict, WorkerId};
use super::writer::{BufPool, PieceWriter, SinkMsg};
use super::{Metered, PieceFailure, CHUNK, NET_RETRIES, PIPELINE_DEPTH};
use crate::datadir::PieceDir;
use crate::net::{read_frame_into, write_frame, FrameError};

/// How long a piece stream may go without an answer to a request before
/// it is dropped (its pieces were raced on other peers long before, after
/// [`super::scheduler::STALL_TIMEOUT`]).
pub const PIECE_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Wait before a new stream after network trouble.
const REOPEN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest an idle worker sleeps before looking at the queue again (it is
/// woken on every change; this is only a safety net).
const IDLE_RECHECK: Duration = Duration::from_millis(500);

/// What went wrong on a piece stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamTrouble {
    /// No stream could be opened.
    #[error("cannot open a piece stream: {0}")]
    Open(#[from] nakshatra_swarm::stream::OpenStreamError),
    /// Reading or writing a frame failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// No answer in time.
    #[error("no data within {PIECE_READ_TIMEOUT:?}")]
    Timeout,
    /// An answer came with no request outstanding.
    #[error("an answer nobody asked for")]
    Unasked,
    /// The peer answered with an error of its own.
    #[error("the peer says: {0}")]
    Peer(String),
    /// The worker's stream went away before the piece was complete.
    #[error("stream dropped")]
    Dropped,
}

/// Network trouble on a piece stream, and whether the peer had answered
/// anything on it yet (a stream dropped at open is reopened at once).
struct PumpError {
    trouble: StreamTrouble,
    answered: bool,
}

/// How a stream's pump ended without network trouble.
enum Pumped {
    /// Nothing more for this peer.
    Done,
    /// Every answer still due was for pieces published elsewhere: the
    /// stream was dropped rather than read to the end.
    Abandoned,
}

/// A piece whose bytes are being requested and received on one stream.
struct Download {
    id: PieceId,
    attempt: AttemptId,
    n_bytes: u64,
    /// Next offset to ask for.
    requested: u64,
    /// Offset up to which answers came back.
    received: u64,
    /// Stopped asking (the peer lacks it or broke the protocol, or another
    /// copy was published); answers still due are read and dropped.
    failed: bool,
    tx: mpsc::Sender<SinkMsg>,
}

/// One stream worker: everything it needs.
pub(super) struct Worker {
    pub(super) swarm: nakshatra_swarm::Client,
    pub(super) peer: PeerId,
    pub(super) sched: Arc<Scheduler>,
    pub(super) manifest: Manifest,
    pub(super) dir: PieceDir,
    pub(super) pool: BufPool,
    /// Its place in the scheduler.
    pub(super) id: WorkerId,
    /// Where its streams count the bytes they read.
    pub(super) meter: Arc<Meter>,
}

/// A worker's pieces under way; they survive a lost stream.
#[derive(Default)]
struct Work {
    downloads: VecDeque<Download>,
}

impl Worker {
    /// Fetches pieces from the peer until there is nothing left for it,
    /// it is found bad, or its streams fail [`NET_RETRIES`] times.
    pub(super) async fn run(self) {
        let mut work = Work::default();
        let mut failures = 0u32;
        let mut dropped_at_open = 0u32;
        let mut last = StreamTrouble::Dropped;
        while !self.sched.should_stop(&self.peer) {
            self.cancel_published(&mut work).await;
            work.downloads.retain(|d| !d.failed);
            if work.downloads.is_empty() {
                // Nothing under way: open a stream only when there is
                // something to ask this peer for.
                let changed = self.sched.changed();
                tokio::pin!(changed);
                changed.as_mut().enable();
                match self.sched.peek(self.id) {
                    Peek::Done => break,
                    Peek::Wait => {
                        let _ = tokio::time::timeout(IDLE_RECHECK, changed).await;
                        continue;
                    }
                    Peek::Work => {}
                }
            }
            let outcome = match self
                .swarm
                .open_stream(self.peer, StreamProtocol::new(PIECE_PROTOCOL))
                .await
            {
                Ok(inner) => {
                    // Requests in flight on a lost stream are lost with it.
                    for d in work.downloads.iter_mut() {
                        d.requested = d.received;
                    }
                    let mut s = Metered::new(inner, self.meter.clone());
                    self.pump(&mut s, &mut work).await
                }
                Err(e) => Err(PumpError {
                    trouble: e.into(),
                    answered: true,
                }),
            };
            let e = match outcome {
                Ok(Pumped::Done) => break,
                Ok(Pumped::Abandoned) => continue,
                Err(e) => e,
            };
            tracing::debug!(peer = %self.peer, "network trouble: {}", e.trouble);
            last = e.trouble;
            // A stream the peer dropped before answering anything (a busy
            // accept loop drops new streams) is reopened at once.
            if !e.answered && dropped_at_open < NET_RETRIES {
                dropped_at_open += 1;
                continue;
            }
            failures += 1;
            if failures >= NET_RETRIES {
                break;
            }
            tokio::time::sleep(REOPEN_BACKOFF).await;
        }
        // Pieces still under way go back to the others; their bytes are
        // kept for a resume, unless this peer served bad data.
        let discard = self.sched.should_stop(&self.peer);
        let last = Arc::new(last);
        for d in work.downloads.drain(..) {
            if !d.failed {
                let why = PieceFailure::Network {
                    peer: self.peer,
                    source: last.clone(),
                };
                let _ = d.tx.send(SinkMsg::Abort { why, discard }).await;
            }
        }
        self.sched.worker_gone(self.id);
    }

    /// Stops the downloads of pieces another attempt published: no more
    /// requests, and their writers throw their bytes away.
    async fn cancel_published(&self, work: &mut Work) {
        for d in work.downloads.iter_mut() {
            if !d.failed && self.sched.is_finished(&d.id) {
                d.failed = true;
                let _ = d.tx.send(SinkMsg::Cancel).await;
            }
        }
    }

    /// Keeps the stream busy until this peer has nothing left to give.
    /// `Err` is network trouble; the pieces still under way are then the
    /// caller's to continue on another stream or to abort.
    async fn pump(
        &self,
        s: &mut Metered<nakshatra_swarm::Stream>,
        work: &mut Work,
    ) -> Result<Pumped, PumpError> {
        let mut answered = false;
        let fail = |answered| move |trouble: StreamTrouble| PumpError { trouble, answered };
        let mut inflight: VecDeque<u64> = VecDeque::new();
        loop {
            // Registered before looking at the queue: a change made after
            // the look wakes this worker.
            let changed = self.sched.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.cancel_published(work).await;
            match self
                .fill(s, work, &mut inflight)
                .await
                .map_err(fail(answered))?
            {
                Fill::Idle => {
                    // Nothing for this peer until a piece comes back or the
                    // last ones are done.
                    let _ = tokio::time::timeout(IDLE_RECHECK, changed).await;
                    continue;
                }
                Fill::Done if inflight.is_empty() => return Ok(Pumped::Done),
                Fill::Done | Fill::Full => {}
            }
            let Some(len) = inflight.pop_front() else {
                continue;
            };
            if !self.receive(s, work, len).await.map_err(fail(answered))? {
                return Ok(Pumped::Abandoned);
            }
            answered = true;
            finish_complete(&mut work.downloads).await;
            if self.sched.should_stop(&self.peer) {
                // This peer served bad bytes, or the disk failed: the
                // caller drops what is still coming.
                return Ok(Pumped::Done);
            }
        }
    }

    /// Sends requests while the pipeline has room: the first piece under
    /// way with bytes not yet asked for, else a new piece.
    async fn fill(
        &self,
        s: &mut Metered<nakshatra_swarm::Stream>,
        work: &mut Work,
        inflight: &mut VecDeque<u64>,
    ) -> Result<Fill, StreamTrouble> {
        while inflight.len() < PIPELINE_DEPTH {
            let open = work
                .downloads
                .iter_mut()
                .find(|d| !d.failed && d.requested < d.n_bytes);
            let Some(d) = open else {
                match self.sched.next_job(self.id) {
                    Next::Job(job) => {
                        self.start(job, work).await;
                        continue;
                    }
                    Next::Wait if inflight.is_empty() => return Ok(Fill::Idle),
                    Next::Wait => return Ok(Fill::Full),
                    Next::Done => return Ok(Fill::Done),
                }
            };
            let len = CHUNK.min(d.n_bytes - d.requested);
            let req = PieceRequest {
                model_id: self.manifest.model_id.clone(),
                piece: piece_ref(&d.id),
                offset: d.requested,
                len,
            };
            write_frame(s, &req, &[]).await?;
            d.requested += len;
            inflight.push_back(len);
        }
        Ok(Fill::Full)
    }

    /// Reads the answer to the oldest request (`len` bytes asked) and
    /// hands it to its piece's writer. `Ok(false)`: while waiting, every
    /// piece with answers still due was published elsewhere (or failed),
    /// so the stream is not worth reading on.
    async fn receive(
        &self,
        s: &mut Metered<nakshatra_swarm::Stream>,
        work: &mut Work,
        len: u64,
    ) -> Result<bool, StreamTrouble> {
        // Pieces whose answers are still due on this stream.
        let due: Vec<PieceId> = work
            .downloads
            .iter()
            .filter(|d| !d.failed && d.received < d.requested)
            .map(|d| d.id)
            .collect();
        let mut buf = self.pool.take();
        // Only the bytes asked for may come back.
        let limit = |r: &PieceResponse| match r {
            PieceResponse::Data { .. } => len as usize,
            _ => 0,
        };
        let (resp, n): (PieceResponse, usize) = {
            let read =
                tokio::time::timeout(PIECE_READ_TIMEOUT, read_frame_into(s, &mut buf, limit));
            tokio::pin!(read);
            loop {
                let changed = self.sched.changed();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if due.iter().all(|id| self.sched.is_finished(id)) {
                    return Ok(false);
                }
                tokio::select! {
                    r = &mut read => break r.map_err(|_| StreamTrouble::Timeout)??,
                    _ = changed => {}
                }
            }
        };
        let d = work
            .downloads
            .iter_mut()
            .find(|d| d.received < d.requested)
            .ok_or(StreamTrouble::Unasked)?;
        d.received += len;
        if d.failed {
            self.pool.put(buf);
            return Ok(true);
        }
        let msg = match resp {
            PieceResponse::Data { total } if total == d.n_bytes && n as u64 == len => {
                self.sched.received(d.attempt, len);
                SinkMsg::Data(buf, n)
            }
            PieceResponse::Data { total } => {
                d.failed = true;
                SinkMsg::Bad(PieceFailure::WrongLength {
                    peer: self.peer,
                    got: n,
                    total,
                    asked: len,
                    n_bytes: d.n_bytes,
                })
            }
            PieceResponse::NotHere => {
                d.failed = true;
                SinkMsg::NotHere
            }
            PieceResponse::Error { message } => return Err(StreamTrouble::Peer(message)),
        };
        // A closed writer hit a local error; `should_stop` sees it.
        let _ = d.tx.send(msg).await;
        Ok(true)
    }

    /// Starts the writer of one attempt, which tells how many bytes a
    /// previous attempt or run left in the piece's `.part` (the download
    /// resumes from there).
    async fn start(&self, job: Job, work: &mut Work) {
        let Some(piece) = self.manifest.piece(&job.id).cloned() else {
            // Not in the manifest (checked before the fetch).
            let why = PieceFailure::NoHolder;
            return self.sched.end(job.attempt, Verdict::NotHere(why));
        };
        let n_bytes = piece.n_bytes;
        let (tx, rx) = mpsc::channel(PIPELINE_DEPTH + 2);
        let (have_tx, have_rx) = oneshot::channel();
        let w = PieceWriter {
            piece,
            dir: self.dir.clone(),
            peer: self.peer,
            sched: self.sched.clone(),
            pool: self.pool.clone(),
            attempt: job.attempt,
            owns_part: job.owns_part,
        };
        // Counted before it runs, so that the fetch waits for it.
        self.sched.writer_started();
        tokio::spawn(w.run(have_tx, rx));
        let Ok(have) = have_rx.await else {
            // The writer could not start (a local error, recorded).
            return;
        };
        if have >= n_bytes {
            // Already complete on disk: only verify.
            let _ = tx.send(SinkMsg::Finish).await;
            return;
        }
        work.downloads.push_back(Download {
            id: job.id,
            attempt: job.attempt,
            n_bytes,
            requested: have,
            received: have,
            failed: false,
            tx,
        });
    }
}

/// What [`Worker::fill`] left the pipeline as.
enum Fill {
    /// No room left, or nothing new to ask for while answers are due.
    Full,
    /// Nothing in flight and nothing to ask for now.
    Idle,
    /// Nothing more for this peer.
    Done,
}

/// Pieces at the front that got every answer leave the worker: complete
/// ones are told to finish.
async fn finish_complete(downloads: &mut VecDeque<Download>) {
    while let Some(d) = downloads.front() {
        let complete = d.received >= d.n_bytes;
        let abandoned = d.failed && d.received >= d.requested;
        if !(complete || abandoned) {
            break;
        }
        if let Some(d) = downloads.pop_front() {
            if !d.failed {
                let _ = d.tx.send(SinkMsg::Finish).await;
            }
        }
    }
}

/// The wire name of a piece.
pub fn piece_ref(id: &PieceId) -> PieceRef {
    match id {
        PieceId::Block(i) => PieceRef::Block(*i),
        PieceId::Embd => PieceRef::Embd,
        PieceId::Head => PieceRef::Head,
        PieceId::Globals => PieceRef::Globals,
    }
}
