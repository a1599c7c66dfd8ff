//! Who fetches what: the queue of pieces, the attempts under way on each
//! piece (a piece may be raced across several peers, first verified copy
//! wins), how fast each stream is going, which peers lack which piece or
//! served bad bytes, network failures per (piece, peer), progress, and the
//! first local error. Shared by every stream worker and piece writer of
//! one fetch; every change wakes idle workers.
//!
//! # Racing
//!
//! A piece is normally fetched by one attempt (one peer's stream). It gets
//! a second source when:
//! * **its sources stall or trickle**: every attempt on it is on a stream
//!   that got no byte for [`STALL_TIMEOUT`] while it had pieces under way,
//!   or whose rate over the last [`RATE_WINDOW`] is below
//!   1/[`SLOW_FACTOR`] of the best rate any stream of this fetch reached.
//!   The [`Scheduler::watch`] tick (every [`WATCH_TICK`]) gives these
//!   verdicts, and a worker asking for work gets such a piece before any
//!   queued one;
//! * **endgame**: nothing is left in the queue for a worker, so it takes a
//!   duplicate of a piece still in flight (the one with the fewest bytes
//!   received), up to [`MAX_HEALTHY_ATTEMPTS`] attempts on healthy streams
//!   per piece.
//!
//! Only a peer that has published a verified piece in this fetch (any
//! peer, until one has) and has not stalled or crawled since races other
//! peers' pieces, so Sybils that never deliver cannot take a stalled
//! piece's place one after another. The slow attempt is not stopped:
//! whichever copy verifies first is published, and the others are
//! cancelled and their files removed.
//!
//! # Relays
//!
//! A peer reached only through a circuit relay ([`Link::Relayed`]) is
//! ranked last, in one place ([`State::direct_source`]): it takes a piece
//! only when no peer reached directly (or not yet connected, which will be
//! dialled directly where its addresses allow) can: none holds it, or
//! those that do have failed it, stalled or crawled, may not race it, or
//! published nothing for [`RELAY_PATIENCE`] while busy.
//! Relayed bytes cost the relay's bandwidth and come slower; when they
//! must be used, the scheduler says so once per peer (an `info` log line
//! and a notice for the user, [`Scheduler::take_notices`]).
//!
//! # Files
//!
//! One attempt at a time owns the piece's `.part` (it resumes the bytes an
//! earlier attempt or run left there); the others write race files of
//! their own (`writer::race_part`), started empty and removed when they
//! lose, fail, or are cancelled. Ownership changes only here, after the
//! writer closed, renamed or removed its file.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nakshatra_slicer::PieceId;
use nakshatra_swarm::PeerId;
use tokio::sync::Notify;

use super::{FetchError, FetchStats, PieceFailure, CHUNK, NET_RETRIES};

/// A stream with pieces under way that gets no byte for this long is
/// stalled: its pieces go to another source at once (it may go on). An
/// honest peer is silent this long only when something is wrong (a chunk
/// takes a few ms to a few hundred ms to start flowing, even from disk).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The window a stream's rate is measured over (it must have had pieces
/// under way for all of it): long enough to span several chunks of an
/// honest stream.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);
/// A stream whose rate over [`RATE_WINDOW`] is below the best rate of any
/// stream of this fetch divided by this is slow: its pieces are raced.
/// The reference is the best stream, not the median, so that Sybils who
/// are many and all slow cannot set it.
pub const SLOW_FACTOR: f64 = 8.0;
/// Attempts on streams that are neither stalled nor slow that one piece may
/// have at once: the first one and one racer (stalled attempts do not
/// count, so Sybils cannot fill a piece's places).
pub const MAX_HEALTHY_ATTEMPTS: usize = 2;
/// How often [`Scheduler::watch`] looks at every stream.
pub const WATCH_TICK: Duration = Duration::from_millis(250);
/// A direct source that has had pieces under way this long without
/// publishing one (in that time) no longer holds relayed peers back: a
/// direct peer that trickles just fast enough not to count as slow (with
/// no faster stream to compare it with, as when the only other holders are
/// relayed) cannot keep them idle. Long enough for an honest stream to
/// finish a large piece.
pub const RELAY_PATIENCE: Duration = Duration::from_secs(30);

/// How this node reaches a source peer, as far as the fetch knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Link {
    /// Not connected yet (its first dial is under way): counted as direct,
    /// since it is dialled at its announced addresses.
    #[default]
    Unknown,
    /// Over at least one direct connection.
    Direct,
    /// Only through a circuit relay: ranked last (see the module doc).
    Relayed,
    /// Its first dial found no connection: its streams go on trying, but
    /// relayed peers do not wait for it.
    Unreachable,
}

impl Link {
    /// Whether a relayed peer leaves a piece to this one.
    fn counts_as_direct(self) -> bool {
        matches!(self, Link::Unknown | Link::Direct)
    }
}

/// The line the user is shown when pieces must come from `peer` through a
/// relay.
pub(super) fn relay_notice(peer: &PeerId) -> String {
    format!("fetching from {peer} through a relay: no direct connection")
}

/// One worker (one stream at a time to one peer), by index.
pub(super) type WorkerId = usize;
/// One attempt at one piece, unique in a fetch.
pub(super) type AttemptId = u64;

/// What a worker should do next.
pub(super) enum Next {
    /// Fetch this piece.
    Job(Job),
    /// Nothing for this peer now, but pieces in flight may come back.
    Wait,
    /// Nothing left for this peer.
    Done,
}

/// What [`Scheduler::peek`] sees for a worker (nothing is taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Peek {
    /// There is a piece for it.
    Work,
    /// Nothing now; pieces in flight may come back.
    Wait,
    /// Nothing left for it.
    Done,
}

/// One attempt at one piece, handed to a worker.
pub(super) struct Job {
    /// The piece.
    pub(super) id: PieceId,
    /// This attempt.
    pub(super) attempt: AttemptId,
    /// Whether it owns the piece's `.part` (and resumes what is there);
    /// else it writes a race file of its own, from the start.
    pub(super) owns_part: bool,
}

/// How an attempt ended (reported once by its writer, after its file was
/// renamed, kept or removed).
pub(super) enum Verdict {
    /// Verified and published by this attempt ([`Scheduler::claim`] said
    /// so).
    Published,
    /// Another copy was published first: this one was thrown away.
    Lost,
    /// The peer lacks the piece: it is not asked for it again.
    NotHere(PieceFailure),
    /// The peer served bytes that do not verify or broke the protocol: it
    /// is asked nothing more (see [`Scheduler::blame`]).
    Bad(PieceFailure),
    /// Network trouble: the peer may try the piece again, up to
    /// [`NET_RETRIES`] times.
    Transient(PieceFailure),
    /// A local error (already recorded): the fetch stops.
    Local,
}

/// Why a stream's pieces are raced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slowness {
    /// No byte for [`STALL_TIMEOUT`].
    Stalled,
    /// Rate far below the best stream's.
    Slow,
}

impl std::fmt::Display for Slowness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slowness::Stalled => write!(f, "no byte for {STALL_TIMEOUT:?}"),
            Slowness::Slow => write!(
                f,
                "under 1/{SLOW_FACTOR} of the best stream's rate over {RATE_WINDOW:?}"
            ),
        }
    }
}

/// Bytes one worker's streams received and when the last one came;
/// updated as bytes arrive (`worker::Metered`), read by the watchdog.
pub(super) struct Meter {
    t0: Instant,
    bytes: AtomicU64,
    /// Milliseconds after `t0` of the last byte (0: none yet).
    last_byte_ms: AtomicU64,
}

impl Meter {
    /// A meter whose times count from `t0`.
    pub(super) fn new(t0: Instant) -> Self {
        Self {
            t0,
            bytes: AtomicU64::new(0),
            last_byte_ms: AtomicU64::new(0),
        }
    }

    /// `n` bytes just arrived.
    pub(super) fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let ms = u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_byte_ms.store(ms.max(1), Ordering::Relaxed);
    }

    /// Bytes counted so far.
    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn last_byte(&self) -> Option<Instant> {
        match self.last_byte_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.t0 + Duration::from_millis(ms)),
        }
    }
}

/// The watchdog's view of one worker.
struct WorkerState {
    peer: PeerId,
    meter: Arc<Meter>,
    /// Attempts under way on it.
    live: usize,
    /// Since when it has had attempts under way (`None`: idle).
    busy_since: Option<Instant>,
    /// Busy time of its earlier busy periods.
    busy_before: Duration,
    /// (time, bytes) samples of the current busy period, the oldest at
    /// most [`RATE_WINDOW`] old (plus one just before it).
    samples: VecDeque<(Instant, u64)>,
    /// Stalled or slow now (its pieces are raced; it races nobody's).
    slowness: Option<Slowness>,
    /// Its run has ended: it takes nothing more.
    gone: bool,
}

impl WorkerState {
    /// Bytes per second over all its busy time, once it received a chunk's
    /// worth: the reference a slow stream is compared with.
    fn reference_rate(&self, now: Instant) -> Option<f64> {
        let bytes = self.meter.bytes();
        let busy = self.busy_before + self.busy_since.map_or(Duration::ZERO, |t| now - t);
        (bytes >= CHUNK && !busy.is_zero()).then(|| bytes as f64 / busy.as_secs_f64())
    }
}

/// One attempt under way.
struct Attempt {
    peer: PeerId,
    worker: WorkerId,
    /// Bytes of the piece it received.
    received: u64,
}

/// A piece with attempts under way (or just published, until its last
/// attempt has cleaned up).
#[derive(Default)]
struct Flight {
    attempts: BTreeMap<AttemptId, Attempt>,
    /// The attempt that owns the piece's `.part`.
    part_owner: Option<AttemptId>,
}

/// The shared state of one fetch (see the module doc).
pub(super) struct Scheduler {
    state: Mutex<State>,
    /// Woken whenever a piece comes back to the queue, leaves the fetch or
    /// gets raced, so that idle workers look again at once.
    wake: Notify,
}

struct State {
    t0: Instant,
    /// Pieces to fetch.
    n_jobs: usize,
    /// Pieces nobody is fetching.
    queue: VecDeque<PieceId>,
    /// Pieces with attempts under way.
    flights: BTreeMap<PieceId, Flight>,
    /// Pieces verified and published.
    finished: HashSet<PieceId>,
    workers: Vec<WorkerState>,
    next_attempt: AttemptId,
    /// Writers still running (each has an attempt to end).
    writers: usize,
    /// Peers that lack a piece, or may not have it again.
    lacks: HashMap<PieceId, HashSet<PeerId>>,
    /// Peers that served bytes that do not verify: asked nothing more.
    bad_peers: HashSet<PeerId>,
    /// Peers that served at least one verified piece.
    served_by: HashSet<PeerId>,
    /// When each peer last published a verified piece.
    published_at: HashMap<PeerId, Instant>,
    /// Peers whose streams were found stalled or slow.
    slow_peers: HashSet<PeerId>,
    /// Peers found stalled or slow that have not published a piece since.
    suspects: HashSet<PeerId>,
    /// Network failures per piece and peer (see [`NET_RETRIES`]).
    net_failures: HashMap<(PieceId, PeerId), u32>,
    /// Why each piece failed last.
    last_error: HashMap<PieceId, PieceFailure>,
    stats: FetchStats,
    /// Bytes received so far, for the progress bar (bytes thrown away are
    /// taken back out).
    progress: u64,
    /// The first local failure (disk full, cache unwritable): the fetch
    /// stops.
    local_error: Option<FetchError>,
    /// How each source is reached (absent: [`Link::Unknown`]).
    links: HashMap<PeerId, Link>,
    /// Relayed peers that were given a piece (the user was told).
    relayed_used: HashSet<PeerId>,
    /// Lines for the user not yet shown ([`Scheduler::take_notices`]).
    notices: Vec<String>,
}

/// Which piece [`State::pick`] found for a worker.
enum Pick {
    /// A piece whose every attempt is stalled or slow.
    Rescue(PieceId),
    /// The queue's entry at this index.
    Queued(usize),
    /// Endgame: a duplicate of a piece in flight.
    Endgame(PieceId),
    Wait,
    Done,
}

impl State {
    fn is_slow(&self, w: WorkerId) -> bool {
        self.workers.get(w).is_some_and(|w| w.slowness.is_some())
    }

    /// Whether any stream to `peer` is stalled or slow now.
    fn peer_is_slow(&self, peer: &PeerId) -> bool {
        self.workers
            .iter()
            .any(|w| w.peer == *peer && w.slowness.is_some())
    }

    /// Whether `peer` may take other peers' pieces (rescue, endgame): it
    /// is not stalled or slow now, has not been since it last published a
    /// piece, and has published one in this fetch (unless nobody has yet).
    /// Sybils that never deliver a verified piece race nobody once an
    /// honest peer has delivered one.
    fn may_race(&self, peer: &PeerId) -> bool {
        !self.peer_is_slow(peer)
            && !self.suspects.contains(peer)
            && (self.served_by.is_empty() || self.served_by.contains(peer))
    }

    fn lacks(&self, id: &PieceId, peer: &PeerId) -> bool {
        self.lacks.get(id).is_some_and(|l| l.contains(peer))
    }

    fn link(&self, peer: &PeerId) -> Link {
        self.links.get(peer).copied().unwrap_or_default()
    }

    /// Whether `peer` has had pieces under way for [`RELAY_PATIENCE`]
    /// without publishing one in that time.
    fn stuck(&self, peer: &PeerId, now: Instant) -> bool {
        let published = self.published_at.get(peer);
        self.workers.iter().any(|w| {
            w.peer == *peer
                && w.busy_since.is_some_and(|t| {
                    let since = published.map_or(t, |p| t.max(*p));
                    now.saturating_duration_since(since) >= RELAY_PATIENCE
                })
        })
    }

    /// Relayed peers are ranked last: this is the one place that says so.
    /// Whether piece `id` (in flight as `flight`, or queued) still has a
    /// source that does not go through a relay, so that a relayed peer
    /// must leave it alone: an attempt on a stream that is neither stalled
    /// nor slow, or a peer that could take it now or soon (reached
    /// directly or not connected yet, with a stream still running, not
    /// bad, not lacking it, not stalled or slow since it last published,
    /// not already on it, and, for a piece in flight, allowed to race);
    /// a peer [`State::stuck`] counts for neither. A relayed peer takes a
    /// piece only when this is false, so the racing, stall and Sybil rules
    /// decide for relays too: a direct source that fails or stalls on a
    /// piece hands it on.
    fn direct_source(&self, id: &PieceId, flight: Option<&Flight>) -> bool {
        let now = Instant::now();
        let attempts = || flight.into_iter().flat_map(|f| f.attempts.values());
        let direct = |p: &PeerId| self.link(p).counts_as_direct() && !self.stuck(p, now);
        if attempts().any(|a| !self.is_slow(a.worker) && direct(&a.peer)) {
            return true;
        }
        self.workers.iter().any(|w| {
            let p = &w.peer;
            !w.gone
                && direct(p)
                && !self.bad_peers.contains(p)
                && !self.lacks(id, p)
                && !self.suspects.contains(p)
                && !self.peer_is_slow(p)
                && !attempts().any(|a| a.peer == *p)
                && (flight.is_none() || self.may_race(p))
        })
    }

    /// Attempts on `f` whose streams are neither stalled nor slow.
    fn healthy(&self, f: &Flight) -> usize {
        f.attempts
            .values()
            .filter(|a| !self.is_slow(a.worker))
            .count()
    }

    /// Pieces in flight (not yet published).
    fn in_flight(&self) -> usize {
        self.flights
            .keys()
            .filter(|id| !self.finished.contains(id))
            .count()
    }

    fn pick(&self, w: WorkerId) -> Pick {
        let Some(peer) = self.workers.get(w).map(|w| w.peer) else {
            return Pick::Done;
        };
        if self.bad_peers.contains(&peer)
            || self.local_error.is_some()
            || self.finished.len() >= self.n_jobs
        {
            return Pick::Done;
        }
        let open = |id: &PieceId, f: &Flight| {
            !self.finished.contains(id)
                && !self.lacks(id, &peer)
                && !f.attempts.values().any(|a| a.peer == peer)
        };
        let racer = self.may_race(&peer);
        // A relayed peer only gets what no direct source can take.
        let relayed = self.link(&peer) == Link::Relayed;
        let left_to_me = |id: &PieceId, f: Option<&Flight>| !relayed || !self.direct_source(id, f);
        // 1. A piece whose sources all stalled or crawl.
        if racer {
            let rescue = self
                .flights
                .iter()
                .find(|(id, f)| open(id, f) && self.healthy(f) == 0 && left_to_me(id, Some(f)));
            if let Some((id, _)) = rescue {
                return Pick::Rescue(*id);
            }
        }
        // 2. The queue.
        let mine = |id: &PieceId| !self.lacks(id, &peer);
        if let Some(i) = self
            .queue
            .iter()
            .position(|id| mine(id) && left_to_me(id, None))
        {
            return Pick::Queued(i);
        }
        // 3. Endgame: the piece in flight with the fewest bytes received.
        if racer {
            let dup = self
                .flights
                .iter()
                .filter(|(id, f)| {
                    open(id, f) && self.healthy(f) < MAX_HEALTHY_ATTEMPTS && left_to_me(id, Some(f))
                })
                .min_by_key(|(_, f)| f.attempts.values().map(|a| a.received).max());
            if let Some((id, _)) = dup {
                return Pick::Endgame(*id);
            }
        }
        // A relayed peer waits on queued pieces left to direct sources:
        // they may fail them.
        if self.in_flight() > 0 || (relayed && self.queue.iter().any(mine)) {
            Pick::Wait
        } else {
            Pick::Done
        }
    }

    /// Starts an attempt at `id` on worker `w`.
    fn start(&mut self, id: PieceId, w: WorkerId, now: Instant) -> Option<Job> {
        let peer = self.workers.get(w)?.peer;
        let attempt = self.next_attempt;
        self.next_attempt += 1;
        let flight = self.flights.entry(id).or_default();
        let owns_part = flight.part_owner.is_none();
        if owns_part {
            flight.part_owner = Some(attempt);
        }
        flight.attempts.insert(
            attempt,
            Attempt {
                peer,
                worker: w,
                received: 0,
            },
        );
        if let Some(ws) = self.workers.get_mut(w) {
            ws.live += 1;
            if ws.busy_since.is_none() {
                ws.busy_since = Some(now);
                ws.samples.clear();
            }
        }
        Some(Job {
            id,
            attempt,
            owns_part,
        })
    }

    /// Removes an attempt; returns its piece and peer.
    fn remove(&mut self, attempt: AttemptId, now: Instant) -> Option<(PieceId, PeerId)> {
        let (id, a) = self.flights.iter_mut().find_map(|(id, f)| {
            let a = f.attempts.remove(&attempt)?;
            if f.part_owner == Some(attempt) {
                f.part_owner = None;
            }
            Some((*id, a))
        })?;
        if self.flights.get(&id).is_some_and(|f| f.attempts.is_empty()) {
            self.flights.remove(&id);
        }
        if let Some(ws) = self.workers.get_mut(a.worker) {
            ws.live = ws.live.saturating_sub(1);
            if ws.live == 0 {
                if let Some(t) = ws.busy_since.take() {
                    ws.busy_before += now - t;
                }
                ws.samples.clear();
                ws.slowness = None;
            }
        }
        Some((id, a.peer))
    }

    /// Puts `id` back in the queue if nobody is fetching it any more.
    fn requeue_if_orphaned(&mut self, id: PieceId) {
        if !self.finished.contains(&id)
            && !self.flights.contains_key(&id)
            && !self.queue.contains(&id)
        {
            self.queue.push_back(id);
        }
    }
}

impl Scheduler {
    /// A scheduler for the pieces in `queue`; `stats` holds what was
    /// already verified on disk.
    pub(super) fn new(queue: Vec<PieceId>, stats: FetchStats) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                t0: Instant::now(),
                n_jobs: queue.len(),
                queue: queue.into(),
                flights: BTreeMap::new(),
                finished: HashSet::new(),
                workers: Vec::new(),
                next_attempt: 0,
                writers: 0,
                lacks: HashMap::new(),
                bad_peers: HashSet::new(),
                served_by: HashSet::new(),
                slow_peers: HashSet::new(),
                suspects: HashSet::new(),
                published_at: HashMap::new(),
                net_failures: HashMap::new(),
                last_error: HashMap::new(),
                stats,
                progress: 0,
                local_error: None,
                links: HashMap::new(),
                relayed_used: HashSet::new(),
                notices: Vec::new(),
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

    /// A future that completes at the next change; create it (and
    /// `enable` it) before looking at the state, so that no change is
    /// missed.
    pub(super) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// A new worker for `peer`, and the meter its streams count bytes on.
    pub(super) fn add_worker(&self, peer: PeerId) -> (WorkerId, Arc<Meter>) {
        let mut s = self.state();
        let meter = Arc::new(Meter::new(s.t0));
        s.workers.push(WorkerState {
            peer,
            meter: meter.clone(),
            live: 0,
            busy_since: None,
            busy_before: Duration::ZERO,
            samples: VecDeque::new(),
            slowness: None,
            gone: false,
        });
        (s.workers.len() - 1, meter)
    }

    /// Worker `w`'s run ended: it is no source any more (relayed peers
    /// may take what it would have).
    pub(super) fn worker_gone(&self, w: WorkerId) {
        self.change(|s| {
            if let Some(ws) = s.workers.get_mut(w) {
                ws.gone = true;
            }
        });
    }

    /// How this node reaches `peer` now (see [`Link`]).
    pub(super) fn set_link(&self, peer: PeerId, link: Link) {
        let mut s = self.state();
        if s.links.insert(peer, link).unwrap_or_default() != link {
            tracing::debug!(%peer, ?link, "piece source link");
            drop(s);
            self.wake.notify_waiters();
        }
    }

    /// How this node reaches `peer`, as last set.
    pub(super) fn link(&self, peer: &PeerId) -> Link {
        self.state().link(peer)
    }

    /// Lines for the user that were not shown yet (each relayed peer used,
    /// once: [`relay_notice`]).
    pub(super) fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut self.state().notices)
    }

    /// Takes the next piece worker `w` may fetch: a piece whose sources
    /// stalled, else a queued one, else (endgame) a duplicate of one in
    /// flight.
    pub(super) fn next_job(&self, w: WorkerId) -> Next {
        let now = Instant::now();
        let mut s = self.state();
        let id = match s.pick(w) {
            Pick::Rescue(id) => {
                s.stats.raced_pieces += 1;
                id
            }
            Pick::Endgame(id) => {
                s.stats.endgame_pieces += 1;
                id
            }
            Pick::Queued(i) => match s.queue.remove(i) {
                Some(id) => id,
                None => return Next::Wait,
            },
            Pick::Wait => return Next::Wait,
            Pick::Done => return Next::Done,
        };
        let job = match s.start(id, w, now) {
            Some(job) => job,
            None => return Next::Done,
        };
        if let Some(peer) = s.workers.get(w).map(|w| w.peer) {
            if s.link(&peer) == Link::Relayed && s.relayed_used.insert(peer) {
                tracing::info!(%peer, "no direct connection: fetching pieces through a relay");
                s.notices.push(relay_notice(&peer));
                s.stats.relayed_peers.push(peer.to_string());
            }
        }
        Next::Job(job)
    }

    /// What [`Scheduler::next_job`] would give worker `w`, taking nothing.
    pub(super) fn peek(&self, w: WorkerId) -> Peek {
        match self.state().pick(w) {
            Pick::Rescue(_) | Pick::Queued(_) | Pick::Endgame(_) => Peek::Work,
            Pick::Wait => Peek::Wait,
            Pick::Done => Peek::Done,
        }
    }

    /// Whether `peer`'s streams should stop (it served bad bytes, or the
    /// fetch hit a local error).
    pub(super) fn should_stop(&self, peer: &PeerId) -> bool {
        let s = self.state();
        s.bad_peers.contains(peer) || s.local_error.is_some()
    }

    /// Whether piece `id` was published (by any attempt).
    pub(super) fn is_finished(&self, id: &PieceId) -> bool {
        self.state().finished.contains(id)
    }

    /// Whether every piece is published, or the fetch hit a local error.
    pub(super) fn is_complete(&self) -> bool {
        let s = self.state();
        s.local_error.is_some() || s.finished.len() >= s.n_jobs
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

    /// `n` bytes of `attempt`'s piece arrived (for the progress bar and
    /// the endgame's choice).
    pub(super) fn received(&self, attempt: AttemptId, n: u64) {
        let mut s = self.state();
        s.progress += n;
        if let Some(a) = s
            .flights
            .values_mut()
            .find_map(|f| f.attempts.get_mut(&attempt))
        {
            a.received += n;
        }
    }

    /// Bytes received that were thrown away after all.
    pub(super) fn discarded(&self, n: u64) {
        let mut s = self.state();
        s.progress = s.progress.saturating_sub(n);
    }

    /// An attempt verified its copy of `id` (`fetched` bytes from `peer`):
    /// `Some(remove_part)` if it is the first, and may publish it (the
    /// piece counts as done from now on; `remove_part`: the piece's
    /// `.part`, owned by nobody, is left over from an earlier attempt and
    /// should go); `None` if another copy was published first.
    pub(super) fn claim(&self, id: PieceId, peer: &PeerId, fetched: u64) -> Option<bool> {
        self.change(|s| {
            if !s.finished.insert(id) {
                return None;
            }
            s.stats.bytes_fetched += fetched;
            if s.link(peer) == Link::Relayed {
                s.stats.relayed_bytes += fetched;
                s.stats.relayed_pieces += 1;
            }
            s.served_by.insert(*peer);
            s.published_at.insert(*peer, Instant::now());
            s.suspects.remove(peer);
            s.stats.sources = s.served_by.len();
            // Nobody owns the `.part` (this attempt wrote a race file): what
            // is there is an earlier attempt's leftover.
            let owner = s.flights.get(&id).and_then(|f| f.part_owner);
            Some(owner.is_none())
        })
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

    /// Ends `attempt` (its writer has dealt with its file). A piece that
    /// nobody fetches any more and is not published goes back to the
    /// queue.
    pub(super) fn end(&self, attempt: AttemptId, verdict: Verdict) {
        let now = Instant::now();
        self.change(|s| {
            let Some((id, peer)) = s.remove(attempt, now) else {
                return;
            };
            match verdict {
                Verdict::Published | Verdict::Lost | Verdict::Local => {}
                Verdict::NotHere(why) | Verdict::Bad(why) => {
                    s.lacks.entry(id).or_default().insert(peer);
                    s.last_error.insert(id, why);
                }
                Verdict::Transient(why) => {
                    let n = s.net_failures.entry((id, peer)).or_default();
                    *n += 1;
                    if *n >= NET_RETRIES {
                        s.lacks.entry(id).or_default().insert(peer);
                    }
                    s.last_error.insert(id, why);
                }
            }
            s.requeue_if_orphaned(id);
        });
    }

    /// A writer started; it will call [`Scheduler::writer_done`] when it
    /// ends.
    pub(super) fn writer_started(&self) {
        self.state().writers += 1;
    }

    /// A writer ended.
    pub(super) fn writer_done(&self) {
        self.change(|s| s.writers = s.writers.saturating_sub(1));
    }

    /// Waits until every writer has ended.
    pub(super) async fn writers_done(&self) {
        loop {
            let changed = self.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.state().writers == 0 {
                return;
            }
            changed.await;
        }
    }

    /// Bytes received and pieces done so far.
    pub(super) fn progress(&self) -> (u64, usize) {
        let s = self.state();
        (s.progress, s.finished.len())
    }

    /// The watchdog's tick: measures every busy stream, marks those that
    /// stalled or crawl (their pieces are raced), clears those that
    /// recovered, and wakes the workers if anything changed.
    pub(super) fn watch(&self) {
        let now = Instant::now();
        let mut s = self.state();
        let best = s
            .workers
            .iter()
            .filter_map(|w| w.reference_rate(now))
            .fold(0.0f64, f64::max);
        let mut changed = false;
        let mut newly = Vec::new();
        for w in s.workers.iter_mut() {
            let Some(busy_since) = w.busy_since else {
                continue;
            };
            let bytes = w.meter.bytes();
            w.samples.push_back((now, bytes));
            while w
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
            {
                w.samples.pop_front();
            }
            let last = w
                .meter
                .last_byte()
                .map_or(busy_since, |t| t.max(busy_since));
            let slowness = if now.duration_since(last) >= STALL_TIMEOUT {
                Some(Slowness::Stalled)
            } else {
                let window = w.samples.front().filter(|(t, _)| {
                    now.duration_since(busy_since) >= RATE_WINDOW
                        && now.duration_since(*t) >= RATE_WINDOW.mul_f64(0.9)
                });
                match window {
                    Some((t, b)) if best > 0.0 => {
                        let rate = (bytes - b) as f64 / now.duration_since(*t).as_secs_f64();
                        (rate * SLOW_FACTOR < best).then_some(Slowness::Slow)
                    }
                    _ => None,
                }
            };
            if slowness != w.slowness {
                changed = true;
                if let Some(why) = slowness {
                    newly.push((w.peer, why));
                }
            }
            w.slowness = slowness;
        }
        for (peer, why) in newly {
            tracing::debug!(%peer, "piece stream slow ({why}): racing its pieces on other peers");
            s.suspects.insert(peer);
            if s.slow_peers.insert(peer) {
                s.stats.slow_peers.push(peer.to_string());
            }
        }
        drop(s);
        if changed {
            self.wake.notify_waiters();
        }
    }

    /// The outcome once every worker and writer has stopped: the local
    /// error if there was one, else the pieces still missing, else the
    /// stats.
    pub(super) fn finish(&self, took: Duration) -> Result<FetchStats, FetchError> {
        let mut s = self.state();
        if let Some(e) = s.local_error.take() {
            return Err(e);
        }
        if s.finished.len() < s.n_jobs {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(_seed: u8) -> PeerId {
        nakshatra_swarm::IdentityKeypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn job(n: Next) -> Job {
        match n {
            Next::Job(j) => j,
            Next::Wait => panic!("wait"),
            Next::Done => panic!("done"),
        }
    }

    /// A stalled stream's piece goes to another peer before the queue,
    /// the first copy claimed wins, and the loser's verdict does not bring
    /// the piece back.
    #[test]
    fn a_stalled_piece_is_raced_and_the_first_copy_wins() {
        let (good, stall) = (peer(1), peer(2));
        let ids = [PieceId::Block(0), PieceId::Block(1), PieceId::Block(2)];
        let s = Scheduler::new(ids.to_vec(), FetchStats::default());
        let (ws, _) = s.add_worker(stall);
        let (wg, mg) = s.add_worker(good);
        let stalled = job(s.next_job(ws));
        assert_eq!(stalled.id, PieceId::Block(0));
        assert!(stalled.owns_part);
        // The good stream gets a chunk's worth through quickly...
        let first = job(s.next_job(wg));
        assert_eq!(first.id, PieceId::Block(1));
        mg.add(CHUNK as usize);
        s.received(first.attempt, CHUNK);
        // ... and the stalled one nothing for STALL_TIMEOUT.
        {
            let mut st = s.state();
            let past = Instant::now() - STALL_TIMEOUT - Duration::from_millis(10);
            st.workers[ws].busy_since = Some(past);
        }
        s.watch();
        assert!(s.state().peer_is_slow(&stall));
        // The good peer is offered the stalled piece before block 2.
        let rescue = job(s.next_job(wg));
        assert_eq!(rescue.id, PieceId::Block(0));
        assert!(!rescue.owns_part, "a racer writes a file of its own");
        // The stalled peer races nobody: only queued work for it.
        let next = job(s.next_job(ws));
        assert_eq!(next.id, PieceId::Block(2));
        assert_eq!(s.claim(PieceId::Block(0), &good, 7), Some(false));
        s.end(rescue.attempt, Verdict::Published);
        assert_eq!(s.claim(PieceId::Block(0), &stall, 3), None);
        s.end(stalled.attempt, Verdict::Lost);
        assert!(s.is_finished(&PieceId::Block(0)));
        assert!(!s.state().queue.contains(&PieceId::Block(0)));
        let st = s.state();
        assert_eq!(st.stats.raced_pieces, 1);
        assert_eq!(st.stats.bytes_fetched, 7);
        assert_eq!(st.stats.slow_peers, vec![stall.to_string()]);
    }

    /// With nothing queued, an idle worker duplicates the piece in flight
    /// with the fewest bytes, at most MAX_HEALTHY_ATTEMPTS per piece; a
    /// failed racer does not requeue a piece another attempt still holds.
    #[test]
    fn endgame_duplicates_pieces_in_flight() {
        let (a, b, c) = (peer(1), peer(2), peer(3));
        let ids = [PieceId::Block(0), PieceId::Block(1)];
        let s = Scheduler::new(ids.to_vec(), FetchStats::default());
        let (wa, _) = s.add_worker(a);
        let (wb, _) = s.add_worker(b);
        let (wc, _) = s.add_worker(c);
        let ja = job(s.next_job(wa));
        let jb = job(s.next_job(wb));
        s.received(ja.attempt, 100);
        // c: queue empty, so a duplicate of the piece with fewer bytes.
        let jc = job(s.next_job(wc));
        assert_eq!(jc.id, jb.id);
        // Both pieces now have two healthy attempts or c's own: nothing
        // more for c except the other one; then a is full for block 1.
        let jc2 = job(s.next_job(wc));
        assert_eq!(jc2.id, ja.id);
        assert!(matches!(s.next_job(wc), Next::Wait));
        assert!(matches!(s.next_job(wa), Next::Wait));
        // c's racer fails: block 0 stays with a, not back in the queue.
        let why = PieceFailure::NoHolder;
        s.end(jc2.attempt, Verdict::Transient(why.clone()));
        assert!(s.state().queue.is_empty());
        // a fails too: nobody holds it, so it is queued again.
        s.end(ja.attempt, Verdict::Transient(why));
        assert_eq!(s.state().queue, vec![PieceId::Block(0)]);
        assert_eq!(s.peek(wa), Peek::Work);
    }

    /// A stream far slower than the best one is slow; an equally fast one
    /// is not.
    #[test]
    fn a_crawling_stream_is_slow() {
        let (fast, crawl) = (peer(1), peer(2));
        let ids: Vec<PieceId> = (0..4).map(PieceId::Block).collect();
        let s = Scheduler::new(ids, FetchStats::default());
        let (wf, mf) = s.add_worker(fast);
        let (wc, mc) = s.add_worker(crawl);
        let _ = job(s.next_job(wf));
        let _ = job(s.next_job(wc));
        let start = Instant::now() - RATE_WINDOW - Duration::from_secs(1);
        {
            let mut st = s.state();
            for w in [wf, wc] {
                st.workers[w].busy_since = Some(start);
                st.workers[w].samples.push_back((start, 0));
            }
        }
        // 100 MB from the fast one, 100 kB from the crawler, both recent.
        mf.add(100_000_000);
        mc.add(100_000);
        s.watch();
        let st = s.state();
        assert_eq!(st.workers[wc].slowness, Some(Slowness::Slow));
        assert_eq!(st.workers[wf].slowness, None);
    }

    /// With a direct and a relayed holder of the same pieces, the direct
    /// one gets them, the relayed one not even at the end; the relayed
    /// one takes a piece only once the direct one has failed it (lacks
    /// it, or stalled on it).
    #[test]
    fn a_direct_holder_is_chosen_over_a_relayed_one() {
        let (direct, relayed) = (peer(1), peer(2));
        let ids = [PieceId::Block(0), PieceId::Block(1)];
        let s = Scheduler::new(ids.to_vec(), FetchStats::default());
        // The relayed peer's worker is added first and asks first.
        let (wr, _) = s.add_worker(relayed);
        let (wd, _) = s.add_worker(direct);
        s.set_link(relayed, Link::Relayed);
        s.set_link(direct, Link::Direct);
        assert!(matches!(s.next_job(wr), Next::Wait));
        assert_eq!(s.peek(wr), Peek::Wait);
        let j0 = job(s.next_job(wd));
        assert_eq!(j0.id, PieceId::Block(0));
        let j1 = job(s.next_job(wd));
        assert_eq!(j1.id, PieceId::Block(1));
        // Endgame: no duplicate through the relay of a healthy direct
        // attempt.
        assert!(matches!(s.next_job(wr), Next::Wait));
        // The direct peer lacks block 1: the relayed one takes it.
        let why = PieceFailure::NotHere(direct);
        s.end(j1.attempt, Verdict::NotHere(why));
        let r1 = job(s.next_job(wr));
        assert_eq!(r1.id, PieceId::Block(1));
        // The direct stream stalls on block 0: the relayed peer races it.
        {
            let mut st = s.state();
            let past = Instant::now() - STALL_TIMEOUT - Duration::from_millis(10);
            st.workers[wd].busy_since = Some(past);
        }
        s.watch();
        let r0 = job(s.next_job(wr));
        assert_eq!(r0.id, PieceId::Block(0));
        assert_eq!(s.claim(PieceId::Block(0), &direct, 10), Some(false));
        s.end(j0.attempt, Verdict::Published);
        assert_eq!(s.claim(PieceId::Block(0), &relayed, 10), None);
        s.end(r0.attempt, Verdict::Lost);
        assert_eq!(s.claim(PieceId::Block(1), &relayed, 5), Some(false));
        s.end(r1.attempt, Verdict::Published);
        assert!(s.is_complete());
        let stats = s.finish(Duration::from_secs(1)).unwrap();
        assert_eq!(stats.bytes_fetched, 15);
        assert_eq!(stats.relayed_bytes, 5);
        assert_eq!(stats.relayed_pieces, 1);
        assert_eq!(stats.relayed_peers, vec![relayed.to_string()]);
        assert_eq!(s.take_notices(), vec![relay_notice(&relayed)]);
    }

    /// With only a relayed holder, the relayed one fetches every piece (the
    /// fetch completes), and the user is told once.
    #[test]
    fn only_a_relayed_holder_is_used() {
        let relayed = peer(1);
        let ids = [PieceId::Block(0), PieceId::Block(1)];
        let s = Scheduler::new(ids.to_vec(), FetchStats::default());
        let (w1, _) = s.add_worker(relayed);
        let (w2, _) = s.add_worker(relayed);
        s.set_link(relayed, Link::Relayed);
        let a = job(s.next_job(w1));
        let b = job(s.next_job(w2));
        for (j, n) in [(a, 3), (b, 4)] {
            assert_eq!(s.claim(j.id, &relayed, n), Some(false));
            s.end(j.attempt, Verdict::Published);
        }
        assert!(s.is_complete());
        assert!(matches!(s.next_job(w1), Next::Done));
        let stats = s.finish(Duration::from_secs(1)).unwrap();
        assert_eq!(stats.relayed_pieces, 2);
        assert_eq!(stats.relayed_bytes, 7);
        assert_eq!(s.take_notices(), vec![relay_notice(&relayed)]);
        assert!(s.take_notices().is_empty());
        assert_eq!(
            relay_notice(&relayed),
            format!("fetching from {relayed} through a relay: no direct connection")
        );
    }

    /// A peer not connected yet counts as direct; once its dial found no
    /// connection, or its streams gave up, the relayed peer takes its
    /// pieces. A direct holder that is suspect (stalled) does not hold a
    /// relayed one back either.
    #[test]
    fn a_relayed_holder_waits_only_for_live_direct_sources() {
        let (pending, relayed, gone) = (peer(1), peer(2), peer(3));
        let ids = [PieceId::Block(0)];
        let s = Scheduler::new(ids.to_vec(), FetchStats::default());
        let (_wp, _) = s.add_worker(pending);
        let (wr, _) = s.add_worker(relayed);
        let (wg, _) = s.add_worker(gone);
        s.set_link(relayed, Link::Relayed);
        s.set_link(gone, Link::Direct);
        assert!(matches!(s.next_job(wr), Next::Wait));
        s.set_link(pending, Link::Unreachable);
        assert!(matches!(s.next_job(wr), Next::Wait), "gone is still up");
        s.worker_gone(wg);
        assert_eq!(job(s.next_job(wr)).id, PieceId::Block(0));
        // Without a relay in the way, nothing changes for direct peers.
        assert_eq!(s.link(&relayed), Link::Relayed);
        assert_eq!(s.link(&peer(4)), Link::Unknown);
    }

    /// A direct source that has had a piece under way for RELAY_PATIENCE
    /// without publishing anything (a trickler too steady to count as
    /// slow) no longer keeps a relayed holder idle.
    #[test]
    fn a_stuck_direct_source_lets_the_relay_in() {
        let (direct, relayed) = (peer(1), peer(2));
        let ids = [PieceId::Block(0), PieceId::Block(1)];
        let s = Scheduler::new(ids.to_vec(), FetchStats::default());
        let (wd, _) = s.add_worker(direct);
        let (wr, _) = s.add_worker(relayed);
        s.set_link(direct, Link::Direct);
        s.set_link(relayed, Link::Relayed);
        let j0 = job(s.next_job(wd));
        assert!(matches!(s.next_job(wr), Next::Wait));
        {
            let mut st = s.state();
            let past = Instant::now() - RELAY_PATIENCE - Duration::from_secs(1);
            st.workers[wd].busy_since = Some(past);
        }
        // The queued piece first, then (endgame) the stuck one's piece.
        assert_eq!(job(s.next_job(wr)).id, PieceId::Block(1));
        assert_eq!(job(s.next_job(wr)).id, j0.id);
    }
}
