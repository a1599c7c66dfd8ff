//! The sessions a hop holds, and which of them may be evicted: a session
//! that has had no step for [`HopContext::evict_idle_after`] gives its
//! slot up when a new `Open` finds none free. A keep-alive step every few
//! minutes (which the idle timeout alone would let through) therefore
//! holds a slot only while nobody else needs it.
//!
//! [`HopContext::evict_idle_after`]: super::HopContext::evict_idle_after

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How long an `Open` that evicted a session waits for its slot to free.
pub const EVICT_WAIT: Duration = Duration::from_secs(2);
/// How long an `Open` that finds every slot taken (none evictable) waits
/// for one to free before the hop says "busy". Every hop of a chain may
/// wait this long: for three hops, the two waits after hop 1 stay under
/// its `NEXT_HOP_READY_TIMEOUT` (30 s), and all three under the asker's
/// `CHAIN_READY_TIMEOUT` (40 s).
pub const OPEN_QUEUE_WAIT: Duration = Duration::from_secs(12);
/// Most `Open`s waiting for a slot at once, per session slot; past it a
/// new `Open` hears "busy" at once (the asker backs off).
pub const QUEUE_PER_SLOT: usize = 4;

/// Every session of this hop, with its last activity.
#[derive(Debug, Default)]
pub struct SessionTable {
    slots: Mutex<HashMap<u64, Slot>>,
    next: AtomicU64,
    /// Woken when an engine session closes.
    freed: tokio::sync::Notify,
    /// `Open`s waiting for a slot now.
    waiting: std::sync::atomic::AtomicUsize,
}

/// One `Open` counted as waiting while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Slot {
    last_active: Instant,
    /// Parked: kept only in case its chain is repaired (see
    /// [`super::resume`]); evictable at once, and before any live one.
    parked: bool,
    /// Fired to evict the session (taken once fired).
    evict: Option<oneshot::Sender<()>>,
}

/// A session's place in the table; dropping it removes the session.
#[derive(Debug)]
pub struct SlotGuard {
    table: Arc<SessionTable>,
    key: u64,
}

impl SessionTable {
    fn slots(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a session, active now; the receiver fires when it is evicted.
    pub fn register(self: &Arc<Self>) -> (SlotGuard, oneshot::Receiver<()>) {
        self.insert(false)
    }

    /// Adds a parked session: evictable at once, before any live one.
    pub fn register_parked(self: &Arc<Self>) -> (SlotGuard, oneshot::Receiver<()>) {
        self.insert(true)
    }

    fn insert(self: &Arc<Self>, parked: bool) -> (SlotGuard, oneshot::Receiver<()>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.slots().insert(
            key,
            Slot {
                last_active: Instant::now(),
                parked,
                evict: Some(tx),
            },
        );
        (
            SlotGuard {
                table: self.clone(),
                key,
            },
            rx,
        )
    }

    /// Says that an engine session closed (its slot is free): wakes the
    /// `Open`s waiting in [`SessionTable::wait_for_slot`].
    pub fn slot_freed(&self) {
        self.freed.notify_waiters();
    }

    /// Waits until `free()` says a slot is free, for up to `wait`, unless
    /// `max_waiting` `Open`s wait already (a queue, not a crowd: past it
    /// the caller says "busy" at once). Returns whether a slot is free;
    /// the caller still races others for it.
    pub async fn wait_for_slot(
        &self,
        free: impl Fn() -> bool,
        wait: Duration,
        max_waiting: usize,
    ) -> bool {
        if free() {
            return true;
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let _counted = Waiting(&self.waiting);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            // Registered before the check, so no close is missed between.
            notified.as_mut().enable();
            if free() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return free();
            }
        }
    }

    /// Sessions parked, or idle for at least `min_idle` (and not already
    /// evicted).
    pub fn evictable(&self, min_idle: Duration) -> usize {
        self.slots()
            .values()
            .filter(|s| s.can_evict(min_idle))
            .count()
    }

    /// Evicts a parked session if there is one, else the session idle the
    /// longest if it has been idle for at least `min_idle`. Returns
    /// whether one was.
    pub fn evict_idlest(&self, min_idle: Duration) -> bool {
        let mut slots = self.slots();
        let idlest = slots
            .values_mut()
            .filter(|s| s.can_evict(min_idle))
            .min_by_key(|s| (!s.parked, s.last_active));
        match idlest.and_then(|s| s.evict.take()) {
            Some(tx) => tx.send(()).is_ok(),
            None => false,
        }
    }
}

impl Slot {
    fn can_evict(&self, min_idle: Duration) -> bool {
        self.evict.is_some() && (self.parked || self.last_active.elapsed() >= min_idle)
    }
}

impl SlotGuard {
    /// Marks the session active now.
    pub fn touch(&self) {
        if let Some(s) = self.table.slots().get_mut(&self.key) {
            s.last_active = Instant::now();
        }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.table.slots().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idlest_session_goes_first_and_only_when_idle_enough() {
        let t = Arc::new(SessionTable::default());
        let (old, mut old_rx) = t.register();
        std::thread::sleep(Duration::from_millis(30));
        let (new, mut new_rx) = t.register();
        assert_eq!(t.evictable(Duration::from_secs(60)), 0);
        assert!(!t.evict_idlest(Duration::from_secs(60)));
        assert_eq!(t.evictable(Duration::from_millis(20)), 1);
        assert!(t.evict_idlest(Duration::ZERO));
        assert!(old_rx.try_recv().is_ok());
        assert!(new_rx.try_recv().is_err());
        // Evicted once only; touching keeps a session off the list.
        new.touch();
        assert_eq!(t.evictable(Duration::from_millis(20)), 0);
        drop(old);
        drop(new);
        assert_eq!(t.evictable(Duration::ZERO), 0);
    }

    #[tokio::test]
    async fn an_open_waits_for_a_slot_in_a_bounded_queue() {
        let t = Arc::new(SessionTable::default());
        let free = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let is_free = {
            let f = free.clone();
            move || f.load(Ordering::Relaxed)
        };
        // Nothing frees: the wait ends at its deadline, no slot.
        assert!(
            !t.wait_for_slot(&is_free, Duration::from_millis(20), 1)
                .await
        );
        // A close while waiting: the waiter gets it at once.
        let (t2, f2) = (t.clone(), free.clone());
        let closer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            f2.store(true, Ordering::Relaxed);
            t2.slot_freed();
        });
        let t0 = std::time::Instant::now();
        assert!(t.wait_for_slot(&is_free, Duration::from_secs(30), 1).await);
        assert!(t0.elapsed() < Duration::from_secs(5));
        closer.await.unwrap();
        // The queue is full: no wait at all.
        free.store(false, Ordering::Relaxed);
        let t3 = t.clone();
        let f3 = free.clone();
        let waiter = tokio::spawn(async move {
            t3.wait_for_slot(
                move || f3.load(Ordering::Relaxed),
                Duration::from_secs(30),
                1,
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = std::time::Instant::now();
        assert!(!t.wait_for_slot(&is_free, Duration::from_secs(30), 1).await);
        assert!(t0.elapsed() < Duration::from_secs(1));
        free.store(true, Ordering::Relaxed);
        t.slot_freed();
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn a_parked_session_goes_first_and_at_once() {
        let t = Arc::new(SessionTable::default());
        let (_idle, mut idle_rx) = t.register();
        std::thread::sleep(Duration::from_millis(30));
        let (_parked, mut parked_rx) = t.register_parked();
        assert_eq!(t.evictable(Duration::from_secs(60)), 1);
        assert!(t.evict_idlest(Duration::ZERO));
        assert!(parked_rx.try_recv().is_ok());
        assert!(idle_rx.try_recv().is_err());
    }
}
