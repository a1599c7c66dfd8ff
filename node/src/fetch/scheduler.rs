//! Who fetches what: the queue of pieces, which peers lack which piece or
//! served bad bytes, network failures per (piece, peer), progress, and
//! the first local error. Shared by every stream worker and piece writer
//! of one fetch; every change wakes idle workers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nakshatra_slicer::PieceId;
use nakshatra_swarm::PeerId;
use tokio::sync::Notify;

use super::{FetchError, FetchStats, PieceFailure, NET_RETRIES};

/// What a worker should do next.
pub(super) enum Next {
    /// Fetch this piece.
    Job(PieceId),
    /// Nothing for this peer now, but pieces in flight may come back.
    Wait,
    /// Nothing left for this peer.
    Done,
}

/// The shared state of one fetch (see the module doc).
pub(super) struct Scheduler {
    state: Mutex<State>,
    /// Woken whenever a piece comes back to the queue or leaves the
    /// fetch, so that idle workers look again at once.
    wake: Notify,
}

struct State {
    queue: VecDeque<PieceId>,
    /// Peers that lack a piece, or may not have it again.
    lacks: HashMap<PieceId, HashSet<PeerId>>,
    /// Peers that served bytes that do not verify: asked nothing more.
    bad_peers: HashSet<PeerId>,
    /// Peers that served at least one verified piece.
    served_by: HashSet<PeerId>,
    /// Network failures per piece and peer (see [`NET_RETRIES`]).
    net_failures: HashMap<(PieceId, PeerId), u32>,
    /// Why each piece failed last.
    last_error: HashMap<PieceId, PieceFailure>,
    stats: FetchStats,
    /// Pieces verified and published.
    done: usize,
    /// Pieces being fetched or written right now (they may come back to
    /// the queue).
    in_flight: usize,
    /// Bytes received so far, for the progress bar (bytes of pieces that
    /// fail are taken back out).
    progress: u64,
    /// The first local failure (disk full, cache unwritable): the fetch
    /// stops.
    local_error: Option<FetchError>,
}

impl Scheduler {
    pub(super) fn new(queue: Vec<PieceId>, stats: FetchStats) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                queue: queue.into(),
                lacks: HashMap::new(),
                bad_peers: HashSet::new(),
                served_by: HashSet::new(),
                net_failures: HashMap::new(),
                last_error: HashMap::new(),
                stats,
                done: 0,
                in_flight: 0,
                progress: 0,
                local_error: None,
            }),
            wake: Notify::new(),
        })
    }

    /// The state. A panic elsewhere while holding the lock leaves counters
    /// that are still consistent enough to finish or fail the fetch, so a
    /// poisoned lock is taken as is.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state and wakes idle workers.
    fn change<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let r = f(&mut self.state());
        self.wake.notify_waiters();
        r
    }

    /// A future that completes at the next change; create it before
    /// looking at the state, so that no change is missed.
    pub(super) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Takes the next piece `peer` may serve.
    pub(super) fn next_job(&self, peer: &PeerId) -> Next {
        let mut s = self.state();
        if s.bad_peers.contains(peer) || s.local_error.is_some() {
            return Next::Done;
        }
        let i = s
            .queue
            .iter()
            .position(|id| !s.lacks.get(id).is_some_and(|l| l.contains(peer)));
        match i.and_then(|i| s.queue.remove(i)) {
            Some(id) => {
                s.in_flight += 1;
                Next::Job(id)
            }
            None if s.in_flight > 0 => Next::Wait,
            None => Next::Done,
        }
    }

    /// Whether `peer`'s streams should stop (it served bad bytes, or the
    /// fetch hit a local error).
    pub(super) fn should_stop(&self, peer: &PeerId) -> bool {
        let s = self.state();
        s.bad_peers.contains(peer) || s.local_error.is_some()
    }

    /// Records the first local failure; every worker stops.
    pub(super) fn local_failure(&self, path: &Path, source: std::io::Error) {
        self.change(|s| {
            s.local_error.get_or_insert(FetchError::Io {
                path: path.to_path_buf(),
                source,
            });
        });
    }

    /// A piece taken with [`Scheduler::next_job`] that will not be fetched
    /// after all (it left the manifest, or its writer could not start).
    pub(super) fn drop_job(&self) {
        self.change(|s| s.in_flight = s.in_flight.saturating_sub(1));
    }

    /// Puts a piece back for the other peers (`peer` will not get it again).
    pub(super) fn requeue(&self, id: PieceId, peer: &PeerId, why: PieceFailure) {
        self.change(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.lacks.entry(id).or_default().insert(*peer);
            s.last_error.insert(id, why);
            s.queue.push_back(id);
        });
    }

    /// Network trouble with `peer`: the piece goes back to the queue, and
    /// `peer` may try it again (a fresh stream) up to [`NET_RETRIES`] times.
    pub(super) fn requeue_transient(&self, id: PieceId, peer: &PeerId, why: PieceFailure) {
        self.change(|s| {
            let n = s.net_failures.entry((id, *peer)).or_default();
            *n += 1;
            if *n >= NET_RETRIES {
                s.lacks.entry(id).or_default().insert(*peer);
            }
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last_error.insert(id, why);
            s.queue.push_back(id);
        });
    }

    /// `peer` served bytes that do not verify: it gets no more requests,
    /// and the `fetched` bytes leave the progress.
    pub(super) fn blame(&self, peer: &PeerId, fetched: u64) {
        self.change(|s| {
            s.progress = s.progress.saturating_sub(fetched);
            s.stats.corrupt_pieces += 1;
            s.bad_peers.insert(*peer);
        });
    }

    /// Bytes received (for the progress bar).
    pub(super) fn received(&self, n: u64) {
        self.state().progress += n;
    }

    /// Bytes received that were thrown away after all.
    pub(super) fn discarded(&self, n: u64) {
        let mut s = self.state();
        s.progress = s.progress.saturating_sub(n);
    }

    /// A piece verified and published; `fetched` bytes came from `peer`.
    pub(super) fn piece_done(&self, peer: &PeerId, fetched: u64) {
        self.change(|s| {
            s.done += 1;
            s.in_flight = s.in_flight.saturating_sub(1);
            s.stats.bytes_fetched += fetched;
            s.served_by.insert(*peer);
            s.stats.sources = s.served_by.len();
        });
    }

    /// Bytes received and pieces done so far.
    pub(super) fn progress(&self) -> (u64, usize) {
        let s = self.state();
        (s.progress, s.done)
    }

    /// The outcome once every worker has stopped: the local error if there
    /// was one, else the pieces still missing, else the stats.
    pub(super) fn finish(&self, n_jobs: usize, took: Duration) -> Result<FetchStats, FetchError> {
        let mut s = self.state();
        if let Some(e) = s.local_error.take() {
            return Err(e);
        }
        if s.done < n_jobs {
            let why = s
                .queue
                .front()
                .and_then(|f| s.last_error.get(f).cloned())
                .unwrap_or(PieceFailure::NoHolder);
            let left: Vec<String> = s.queue.iter().map(ToString::to_string).collect();
            return Err(FetchError::Piece {
                pieces: if left.is_empty() {
                    "?".into()
                } else {
                    left.join(", ")
                },
                why: Box::new(why),
            });
        }
        s.stats.seconds = took.as_secs_f64();
        s.stats.bad_peers = s.bad_peers.iter().map(ToString::to_string).collect();
        Ok(s.stats.clone())
    }
}
