//! One attempt at one piece: its bytes hashed while written to a file
//! (the piece's `<piece>.part` when the attempt owns it, else a race file
//! of its own), verified, then renamed to `<piece>.bin` if it is the first
//! copy to verify. File work runs on blocking threads, one chunk at a
//! time, so a stalled attempt holds no thread. Every change of the
//! attempt's state in the [`Scheduler`] happens here, after its file was
//! renamed, kept or removed, so a piece's `.part` is never written by two
//! attempts at once.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use nakshatra_slicer::{Piece, PieceHasher, PieceId};
use nakshatra_swarm::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::scheduler::{AttemptId, Scheduler, Verdict};
use super::PieceFailure;
use crate::datadir::PieceDir;

/// Bytes read at a time when hashing a piece file.
const HASH_READ: usize = 4 << 20;

/// Messages from a stream worker to a piece's writer.
pub(super) enum SinkMsg {
    /// The next bytes of the piece, in order: the first `.1` bytes of the
    /// buffer (handed back to the [`BufPool`] once written).
    Data(Vec<u8>, usize),
    /// Every byte was sent: verify and publish.
    Finish,
    /// The peer lacks the piece: it goes to the others.
    NotHere,
    /// The peer broke the protocol for this piece (wrong length): it is
    /// treated as a bad peer.
    Bad(PieceFailure),
    /// The stream failed: the piece goes back to the queue. `discard`
    /// drops the bytes received so far (they came from a peer found bad).
    Abort { why: PieceFailure, discard: bool },
    /// Another copy of the piece was published: this one is thrown away.
    Cancel,
}

/// Receive buffers handed back by the piece writers, so that a chunk's
/// buffer is allocated (and its pages faulted in) once, not per chunk.
#[derive(Clone, Default)]
pub(super) struct BufPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufPool {
    /// Buffers kept at most (a few per stream in flight).
    const KEEP: usize = 16;

    pub(super) fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    pub(super) fn put(&self, buf: Vec<u8>) {
        let mut v = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if v.len() < Self::KEEP {
            v.push(buf);
        }
    }
}

/// The race file of `attempt` at piece `id`: written by an attempt that
/// does not own the piece's `.part`, never resumed.
pub(super) fn race_part(dir: &PieceDir, id: &PieceId, attempt: AttemptId) -> PathBuf {
    dir.path().join(format!("{id}.r{attempt}.part"))
}

/// Removes every race file in `dir` (left by a run that was killed, or by
/// an attempt that could not remove its own).
pub(super) fn remove_race_files(dir: &PieceDir) {
    let Ok(rd) = std::fs::read_dir(dir.path()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let race = name
            .strip_suffix(".part")
            .and_then(|n| n.rsplit_once(".r"))
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if race {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Hashes a file as `piece`; true when it matches the manifest.
pub(super) fn verify_file(path: &Path, piece: &Piece) -> bool {
    let mut h = PieceHasher::new(piece);
    hash_file(path, &mut h).is_ok_and(|_| h.finalize().is_ok())
}

/// Feeds a file into `h` in [`HASH_READ`] blocks; returns its length.
fn hash_file(path: &Path, h: &mut PieceHasher) -> std::io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; HASH_READ];
    let mut n_total = 0u64;
    loop {
        match f.read(&mut buf)? {
            0 => return Ok(n_total),
            n => {
                h.update(buf.get(..n).unwrap_or_default());
                n_total += n as u64;
            }
        }
    }
}

/// Runs `f` on a blocking thread; a panic there is an I/O error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// The writer of one attempt (see the module doc).
pub(super) struct PieceWriter {
    pub(super) piece: Piece,
    pub(super) dir: PieceDir,
    /// The peer whose stream feeds this attempt (blamed for bad bytes).
    pub(super) peer: PeerId,
    pub(super) sched: Arc<Scheduler>,
    pub(super) pool: BufPool,
    /// This attempt.
    pub(super) attempt: AttemptId,
    /// Whether it owns the piece's `.part` (see [`Scheduler`]).
    pub(super) owns_part: bool,
}

/// What the writer holds while bytes arrive.
struct Sink {
    hasher: PieceHasher,
    /// Opened at the first byte (a stalled attempt holds no file open).
    file: Option<std::fs::File>,
    /// Bytes the `.part` held when the attempt started.
    have: u64,
    /// Bytes received by this attempt.
    fetched: u64,
}

impl PieceWriter {
    /// This attempt's file.
    fn path(&self) -> PathBuf {
        if self.owns_part {
            self.dir.part(&self.piece.id)
        } else {
            race_part(&self.dir, &self.piece.id, self.attempt)
        }
    }

    /// Resumes the `.part` an earlier attempt or run left (if this attempt
    /// owns it; its length goes back over `have_tx`, the stream asks for
    /// the rest), writes what arrives on `rx`, then verifies and publishes.
    /// Ends the attempt in the scheduler exactly once, whatever happens.
    /// The worker counted it with [`Scheduler::writer_started`].
    pub(super) async fn run(self, have_tx: oneshot::Sender<u64>, rx: mpsc::Receiver<SinkMsg>) {
        /// Tells the scheduler the writer ended, even if it panicked.
        struct Ended(Arc<Scheduler>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.writer_done();
            }
        }
        let _ended = Ended(self.sched.clone());
        let verdict = self.write(have_tx, rx).await;
        self.sched.end(self.attempt, verdict);
    }

    async fn write(
        &self,
        have_tx: oneshot::Sender<u64>,
        mut rx: mpsc::Receiver<SinkMsg>,
    ) -> Verdict {
        let path = self.path();
        let sink = {
            let (piece, path, resume) = (self.piece.clone(), path.clone(), self.owns_part);
            blocking(move || Ok(start(&piece, &path, resume))).await
        };
        let Ok(mut sink) = sink else {
            return Verdict::Local;
        };
        if have_tx.send(sink.have).is_err() {
            // The worker went away before asking anything.
            return self.cut(self.dropped(), &path, &sink).await;
        }
        loop {
            match rx.recv().await {
                Some(SinkMsg::Data(buf, n)) => {
                    let p = path.clone();
                    let r = blocking(move || {
                        let r = sink.write(&p, buf.get(..n).unwrap_or(&buf));
                        Ok((sink, buf, r))
                    })
                    .await;
                    match r {
                        Ok((s, buf, Ok(()))) => {
                            sink = s;
                            self.pool.put(buf);
                        }
                        Ok((_, _, Err(e))) | Err(e) => {
                            let _ = blocking(move || std::fs::remove_file(&path)).await;
                            self.sched.local_failure(&self.path(), e);
                            return Verdict::Local;
                        }
                    }
                }
                Some(SinkMsg::Finish) => return self.publish(sink, &path).await,
                Some(other) => return self.cut(other, &path, &sink).await,
                None => return self.cut(self.dropped(), &path, &sink).await,
            }
        }
    }

    /// What the worker's going away means: network trouble, unless the
    /// peer was found bad or the fetch hit a local error (then the bytes
    /// go).
    fn dropped(&self) -> SinkMsg {
        let why = PieceFailure::Network {
            peer: self.peer,
            source: Arc::new(super::worker::StreamTrouble::Dropped),
        };
        let discard = self.sched.should_stop(&self.peer);
        SinkMsg::Abort { why, discard }
    }

    /// The attempt ends without a verified copy: the piece goes back to the
    /// others. A `.part` keeps its bytes for a resume unless they came
    /// from a peer found bad; a race file always goes.
    async fn cut(&self, msg: SinkMsg, path: &Path, sink: &Sink) -> Verdict {
        let (have, fetched) = (sink.have, sink.fetched);
        let finished = self.sched.is_finished(&self.piece.id);
        let (verdict, keep) = match msg {
            // A protocol breach is blamed even if the piece is in.
            SinkMsg::Bad(why) => {
                self.blame(&why, fetched);
                (Verdict::Bad(why), false)
            }
            // Published by another attempt meanwhile: nothing to keep.
            _ if finished => (Verdict::Lost, false),
            SinkMsg::Cancel => (Verdict::Lost, false),
            SinkMsg::NotHere => (Verdict::NotHere(PieceFailure::NotHere(self.peer)), true),
            SinkMsg::Abort { why, discard } => {
                (Verdict::Transient(why), !discard && have + fetched > 0)
            }
            SinkMsg::Data(..) | SinkMsg::Finish => (Verdict::Lost, false),
        };
        if !(keep && self.owns_part) {
            let p = path.to_path_buf();
            let _ = blocking(move || std::fs::remove_file(&p)).await;
            if !matches!(verdict, Verdict::Bad(_)) {
                // (A bad peer's bytes already left the progress.)
                self.sched.discarded(fetched);
            }
        }
        verdict
    }

    /// Every byte arrived: verify, then publish under the final name if no
    /// other copy was published first.
    async fn publish(&self, sink: Sink, path: &Path) -> Verdict {
        let id = self.piece.id;
        let resumed = sink.have > 0;
        let fetched = sink.fetched;
        drop(sink.file);
        if let Err(e) = sink.hasher.finalize() {
            let p = path.to_path_buf();
            let _ = blocking(move || std::fs::remove_file(&p)).await;
            let e = Arc::new(e);
            if resumed {
                // Part of it came from an earlier attempt, maybe another
                // peer: nobody is blamed, the piece starts over.
                tracing::warn!(piece = %id, "resumed piece failed verification: {e}; fetching it again from the start");
                self.sched.discarded(fetched);
                return Verdict::Transient(PieceFailure::ResumeCorrupt(e));
            }
            let why = PieceFailure::Corrupt {
                peer: self.peer,
                source: e,
            };
            self.blame(&why, fetched);
            return Verdict::Bad(why);
        }
        let Some(remove_part) = self.sched.claim(id, &self.peer, fetched) else {
            // Another copy won the race.
            let p = path.to_path_buf();
            let _ = blocking(move || std::fs::remove_file(&p)).await;
            self.sched.discarded(fetched);
            return Verdict::Lost;
        };
        // Visible under its final name. No fsync: a `.bin` is trusted only
        // after hashing it again when a fetch starts, so a piece a power
        // cut truncated is fetched again, never used.
        let (from, bin, part) = (path.to_path_buf(), self.dir.bin(&id), self.dir.part(&id));
        let renamed = blocking(move || {
            let r = std::fs::rename(&from, &bin);
            if r.is_err() {
                let _ = std::fs::remove_file(&from);
            }
            if remove_part {
                let _ = std::fs::remove_file(&part);
            }
            r
        })
        .await;
        if let Err(e) = renamed {
            self.sched.local_failure(&self.dir.bin(&id), e);
            return Verdict::Local;
        }
        Verdict::Published
    }

    /// This peer served bytes that do not verify: it gets no more requests.
    fn blame(&self, why: &PieceFailure, fetched: u64) {
        tracing::warn!(peer = %self.peer, piece = %self.piece.id, "piece failed verification: {why}; refetching it elsewhere and avoiding this peer");
        self.sched.blame(&self.peer, fetched);
    }
}

/// The attempt's starting point: what a previous attempt or run left in
/// the `.part` when `resume` (hashed; only trusted once the whole piece
/// verifies; one over length is dropped), else nothing.
fn start(piece: &Piece, path: &Path, resume: bool) -> Sink {
    let mut hasher = PieceHasher::new(piece);
    let have = if resume {
        match hash_file(path, &mut hasher) {
            Ok(n) if n > 0 && n <= piece.n_bytes => n,
            _ => {
                hasher = PieceHasher::new(piece);
                0
            }
        }
    } else {
        0
    };
    Sink {
        hasher,
        file: None,
        have,
        fetched: 0,
    }
}

impl Sink {
    /// Hashes and appends `data` to the attempt's file at `path`, opening
    /// it at the first call (appending to what it resumed, else created
    /// empty).
    fn write(&mut self, path: &Path, data: &[u8]) -> std::io::Result<()> {
        let file = match &mut self.file {
            Some(f) => f,
            None => {
                let f = if self.have > 0 {
                    std::fs::OpenOptions::new().append(true).open(path)?
                } else {
                    std::fs::File::create(path)?
                };
                self.file.insert(f)
            }
        };
        self.hasher.update(data);
        file.write_all(data)?;
        self.fetched += data.len() as u64;
        Ok(())
    }
}
