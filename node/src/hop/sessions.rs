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

/// Every session of this hop, with its last activity.
#[derive(Debug, Default)]
pub struct SessionTable {
    slots: Mutex<HashMap<u64, Slot>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    last_active: Instant,
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
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.slots().insert(
            key,
            Slot {
                last_active: Instant::now(),
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

    /// Sessions idle for at least `min_idle` (and not already evicted).
    pub fn evictable(&self, min_idle: Duration) -> usize {
        self.slots()
            .values()
            .filter(|s| s.evict.is_some() && s.last_active.elapsed() >= min_idle)
            .count()
    }

    /// Evicts the session idle the longest, if it has been idle for at
    /// least `min_idle`. Returns whether one was.
    pub fn evict_idlest(&self, min_idle: Duration) -> bool {
        let mut slots = self.slots();
        let idlest = slots
            .values_mut()
            .filter(|s| s.evict.is_some() && s.last_active.elapsed() >= min_idle)
            .min_by_key(|s| s.last_active);
        match idlest.and_then(|s| s.evict.take()) {
            Some(tx) => tx.send(()).is_ok(),
            None => false,
        }
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
}
