//! One piece's bytes on a blocking thread: hashed while written to
//! `<piece>.part`, verified, then renamed to `<piece>.bin`. Every change of
//! the piece's state in the [`Scheduler`] happens here, after the file is
//! closed, so a requeued piece is never written twice at once.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use nakshatra_slicer::{Piece, PieceHasher};
use nakshatra_swarm::PeerId;
use tokio::sync::{mpsc, oneshot};

use super::scheduler::Scheduler;
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

/// The writer of one piece (see the module doc).
pub(super) struct PieceWriter {
    pub(super) piece: Piece,
    pub(super) dir: PieceDir,
    /// The peer whose stream feeds this piece (blamed for bad bytes).
    pub(super) peer: PeerId,
    pub(super) sched: Arc<Scheduler>,
    pub(super) pool: BufPool,
}

/// How a piece's stream ended, as the writer saw it.
enum Ending {
    /// Every byte arrived: verify.
    Complete,
    /// Not complete: what the worker said, or that it went away.
    Cut(SinkMsg),
}

impl PieceWriter {
    /// Runs on a blocking thread: resumes the `.part` left by an earlier
    /// run (its length goes back over `have_tx`, the stream asks for the
    /// rest), writes what arrives on `rx`, then verifies and publishes.
    pub(super) fn run(self, have_tx: oneshot::Sender<u64>, rx: mpsc::Receiver<SinkMsg>) {
        let part = self.dir.part(&self.piece.id);
        // What a previous run left in `.part` is hashed first (it is only
        // trusted once the whole piece verifies); one over length is
        // dropped.
        let mut hasher = PieceHasher::new(&self.piece);
        let have = match hash_file(&part, &mut hasher) {
            Ok(n) if n > 0 && n <= self.piece.n_bytes => n,
            _ => {
                hasher = PieceHasher::new(&self.piece);
                0
            }
        };
        let opened = if have > 0 {
            std::fs::OpenOptions::new().append(true).open(&part)
        } else {
            std::fs::File::create(&part)
        };
        let file = match opened {
            Ok(f) => f,
            Err(e) => return self.sched.local_failure(&part, e),
        };
        if have_tx.send(have).is_err() {
            return;
        }
        let Some((ending, fetched)) = self.receive(file, &mut hasher, rx) else {
            return;
        };
        match ending {
            Ending::Complete => self.publish(hasher, have > 0, fetched),
            Ending::Cut(msg) => self.cut(msg, have, fetched),
        }
    }

    /// Writes the bytes that arrive until the worker finishes or stops.
    /// `None`: a local write error (recorded; the `.part` is removed).
    fn receive(
        &self,
        mut file: std::fs::File,
        hasher: &mut PieceHasher,
        mut rx: mpsc::Receiver<SinkMsg>,
    ) -> Option<(Ending, u64)> {
        let part = self.dir.part(&self.piece.id);
        let mut fetched = 0u64;
        loop {
            match rx.blocking_recv() {
                Some(SinkMsg::Data(buf, n)) => {
                    let data = buf.get(..n).unwrap_or(&buf);
                    hasher.update(data);
                    if let Err(e) = file.write_all(data) {
                        drop(file);
                        let _ = std::fs::remove_file(&part);
                        self.sched.local_failure(&part, e);
                        return None;
                    }
                    fetched += data.len() as u64;
                    self.pool.put(buf);
                }
                Some(SinkMsg::Finish) => return Some((Ending::Complete, fetched)),
                Some(other) => return Some((Ending::Cut(other), fetched)),
                None => {
                    let why = PieceFailure::Network {
                        peer: self.peer,
                        source: Arc::new(super::worker::StreamTrouble::Dropped),
                    };
                    let abort = SinkMsg::Abort {
                        why,
                        discard: false,
                    };
                    return Some((Ending::Cut(abort), fetched));
                }
            }
        }
    }

    /// The piece did not arrive whole: back to the queue, its bytes kept
    /// for a resume unless they came from a peer found bad.
    fn cut(&self, msg: SinkMsg, have: u64, fetched: u64) {
        let id = self.piece.id;
        let part = self.dir.part(&id);
        match msg {
            SinkMsg::NotHere => {
                self.sched
                    .requeue(id, &self.peer, PieceFailure::NotHere(self.peer))
            }
            SinkMsg::Bad(why) => {
                let _ = std::fs::remove_file(&part);
                self.blame(&why, fetched);
                self.sched.requeue(id, &self.peer, why);
            }
            SinkMsg::Abort { why, discard } => {
                if discard || have + fetched == 0 {
                    let _ = std::fs::remove_file(&part);
                    self.sched.discarded(fetched);
                }
                self.sched.requeue_transient(id, &self.peer, why);
            }
            SinkMsg::Data(..) | SinkMsg::Finish => {}
        }
    }

    /// Every byte arrived: verify, then publish under the final name.
    fn publish(&self, hasher: PieceHasher, resumed: bool, fetched: u64) {
        let id = self.piece.id;
        let (part, bin) = (self.dir.part(&id), self.dir.bin(&id));
        if let Err(e) = hasher.finalize() {
            let _ = std::fs::remove_file(&part);
            let e = Arc::new(e);
            if resumed {
                // Part of it came from an earlier attempt, maybe another
                // peer: nobody is blamed, the piece starts over.
                tracing::warn!(piece = %id, "resumed piece failed verification: {e}; fetching it again from the start");
                self.sched.discarded(fetched);
                self.sched
                    .requeue_transient(id, &self.peer, PieceFailure::ResumeCorrupt(e));
            } else {
                let why = PieceFailure::Corrupt {
                    peer: self.peer,
                    source: e,
                };
                self.blame(&why, fetched);
                self.sched.requeue(id, &self.peer, why);
            }
            return;
        }
        // Visible under its final name. No fsync: a `.bin` is trusted only
        // after hashing it again when a fetch starts, so a piece a power
        // cut truncated is fetched again, never used.
        if let Err(e) = std::fs::rename(&part, &bin) {
            let _ = std::fs::remove_file(&part);
            return self.sched.local_failure(&bin, e);
        }
        self.sched.piece_done(&self.peer, fetched);
    }

    /// This peer served bytes that do not verify: it gets no more requests.
    fn blame(&self, why: &PieceFailure, fetched: u64) {
        tracing::warn!(peer = %self.peer, piece = %self.piece.id, "piece failed verification: {why}; refetching it elsewhere and avoiding this peer");
        self.sched.blame(&self.peer, fetched);
    }
}
