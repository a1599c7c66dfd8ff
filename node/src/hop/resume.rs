//! Sessions that outlive their chain. When a chain breaks (a hop died,
//! stalled or lost its link), the hops that are still up keep their part
//! of the session for [`PARK_GRACE`]: the KV cache and a [`History`] of
//! what they sent. The asker's replacement chain keeps the session id;
//! a hop that finds the session parked for the same asker resumes it
//! ([`Resumable::take`]) and answers the replay of the history from its
//! [`History`] without computing, so only the replacement hops compute
//! the history again.
//!
//! A parked session holds its engine slot, but gives it up at once to a
//! new session that needs it (see [`SessionTable::register_parked`]), and
//! its engine session is closed when the grace ends. A session still
//! live when its replacement arrives (its upstream stalled rather than
//! died, so its stream has not ended) is asked to park
//! ([`Resumable::take`] waits up to [`PREEMPT_WAIT`] for it).
//!
//! A session is found by (asker, session id). Only a peer the new chain
//! names as this hop's upstream can open it (see `check_open`), so taking
//! over a session needs its 64-bit id, which only that chain's asker and
//! hops know.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nakshatra_swarm::protocol::act::Sampling;
use nakshatra_swarm::{PeerId, QuotaPermit};
use tokio::sync::oneshot;

use super::SessionTable;
use crate::engine::service::EngineService;
use crate::engine::SessionId;

/// How long a hop keeps a session whose chain broke, for a replacement
/// chain to resume (the asker's detection and re-planning take well
/// under this; `--recover-wait` longer than it costs a full replay).
pub const PARK_GRACE: Duration = Duration::from_secs(60);
/// How long resuming a session that is still live (its old upstream
/// stalled) waits for it to park.
pub const PREEMPT_WAIT: Duration = Duration::from_secs(2);
/// How often [`Resumable::take`] looks whether a preempted session has
/// parked.
const PREEMPT_POLL: Duration = Duration::from_millis(5);

/// What a hop sent for a session's positions so far, so that a replay of
/// them is answered without computing. Bounded by the session's context:
/// `ctx × n_embd × 4` bytes at most on a hop that sends hidden states,
/// 40 bytes per step on the last hop.
///
/// The rows of a speculative step's drafted positions are tentative: the
/// draft may be rejected at the last hop, which this hop never hears of.
/// They are kept but not answered from until a later step vouches for
/// them by starting past them ([`History::confirm`]); a step that starts
/// inside them drops the rest ([`History::truncate`]).
#[derive(Debug)]
pub enum History {
    /// A hop before the last: the hidden state it sent for each position,
    /// row-major, positions `0..rows.len() / n_embd`.
    Hidden {
        /// Row width.
        n_embd: usize,
        /// The rows.
        rows: Vec<f32>,
        /// Positions `0..confirmed` are the chain's own (not drafts that
        /// may have been rejected); only those are answered from.
        confirmed: u32,
    },
    /// The last hop: the token sampled by each step, by the position the
    /// step ended at (increasing). Only accepted tokens are recorded, so
    /// nothing here is tentative.
    Tokens(Vec<Sampled>),
}

/// One step's result at the last hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampled {
    /// The position after the step's last token.
    pub end: u32,
    /// The token sampled.
    pub token: i32,
    /// The digest of the logits it was sampled from.
    pub digest: [u8; 32],
}

impl History {
    /// An empty history for a hop that sends hidden states `n_embd` wide
    /// (`None`: the last hop).
    pub fn new(n_embd: Option<usize>) -> Self {
        match n_embd {
            Some(n_embd) => History::Hidden {
                n_embd,
                rows: Vec::new(),
                confirmed: 0,
            },
            None => History::Tokens(Vec::new()),
        }
    }

    /// Forgets everything at or past position `pos`.
    pub fn truncate(&mut self, pos: u32) {
        match self {
            History::Hidden {
                n_embd,
                rows,
                confirmed,
            } => {
                rows.truncate(pos as usize * *n_embd);
                *confirmed = (*confirmed).min(pos);
            }
            History::Tokens(t) => t.retain(|s| s.end <= pos),
        }
    }

    /// A step starts at `pos`: every position before it is the chain's
    /// own, drafted or not.
    pub fn confirm(&mut self, pos: u32) {
        if let History::Hidden {
            n_embd,
            rows,
            confirmed,
        } = self
        {
            let held = (rows.len() / (*n_embd).max(1)) as u32;
            *confirmed = (*confirmed).max(pos.min(held));
        }
    }

    /// Records the rows sent for positions from `pos`, of which the last
    /// `drafted` are tentative. A gap (rows that do not start where the
    /// history ends) clears the history: it must hold every position from
    /// 0 to be of use.
    pub fn record_hidden(&mut self, pos: u32, sent: &[f32], drafted: usize) {
        if let History::Hidden {
            n_embd,
            rows,
            confirmed,
        } = self
        {
            let width = (*n_embd).max(1);
            let whole_rows = sent.chunks_exact(width).remainder().is_empty();
            if rows.len() == pos as usize * *n_embd && whole_rows {
                rows.extend_from_slice(sent);
                if *confirmed == pos {
                    let sure = (sent.len() / width).saturating_sub(drafted);
                    *confirmed = pos.saturating_add(sure as u32);
                }
            } else {
                rows.clear();
                *confirmed = 0;
            }
        }
    }

    /// Records the token sampled by a step that ended at `end`.
    pub fn record_token(&mut self, end: u32, token: i32, digest: [u8; 32]) {
        if let History::Tokens(t) = self {
            t.retain(|s| s.end < end);
            t.push(Sampled { end, token, digest });
        }
    }

    /// The rows sent for positions `pos .. pos + n`, if held and
    /// confirmed.
    pub fn hidden(&self, pos: u32, n: u32) -> Option<&[f32]> {
        let History::Hidden {
            n_embd,
            rows,
            confirmed,
        } = self
        else {
            return None;
        };
        if pos.checked_add(n)? > *confirmed {
            return None;
        }
        let a = (pos as usize).checked_mul(*n_embd)?;
        let b = (pos as usize)
            .checked_add(n as usize)?
            .checked_mul(*n_embd)?;
        rows.get(a..b)
    }

    /// What the step that ended at `end` sampled, if held.
    pub fn token(&self, end: u32) -> Option<Sampled> {
        let History::Tokens(t) = self else {
            return None;
        };
        t.binary_search_by_key(&end, |s| s.end)
            .ok()
            .and_then(|i| t.get(i).copied())
    }
}

/// A session's state on this hop, whichever stream feeds it.
#[derive(Debug)]
pub struct Held {
    /// The engine session (its KV cache).
    pub id: SessionId,
    /// One of the asker's share of this node's sessions.
    pub permit: QuotaPermit,
    /// Positions the KV cache holds.
    pub pos: u32,
    /// What was sent for them.
    pub history: History,
    /// The sampling the session was opened with (the last hop's history
    /// holds tokens sampled with it).
    pub sampling: Sampling,
    /// While parked, the last hop's token stream to the asker, held open:
    /// its end would tell the asker that this hop failed, when the chain
    /// broke upstream of it (the hop that saw that reports it).
    pub linger: Option<nakshatra_swarm::Stream>,
}

/// (asker, session id).
pub type Key = (PeerId, u64);

#[derive(Debug)]
enum Entry {
    /// Running: asked to park through `preempt`.
    Live {
        token: u64,
        preempt: Option<oneshot::Sender<()>>,
    },
    /// Parked until taken or its grace ends; dropping `_cancel` ends the
    /// task that would close it.
    Parked {
        token: u64,
        held: Box<Held>,
        _cancel: oneshot::Sender<()>,
    },
}

impl Entry {
    fn token(&self) -> u64 {
        match self {
            Entry::Live { token, .. } | Entry::Parked { token, .. } => *token,
        }
    }
}

/// Every session of this hop that a replacement chain could resume.
#[derive(Debug, Default)]
pub struct Resumable {
    entries: Mutex<HashMap<Key, Entry>>,
    next: AtomicU64,
}

/// A live session's entry; removed on drop unless the session parked (or
/// another took the key).
#[derive(Debug)]
pub struct LiveGuard {
    table: Arc<Resumable>,
    key: Key,
    token: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut m = self.table.entries();
        if matches!(m.get(&self.key), Some(Entry::Live { token, .. }) if *token == self.token) {
            m.remove(&self.key);
        }
    }
}

impl Resumable {
    fn entries(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks session `key` as running here; the receiver fires when a
    /// replacement chain wants it (the session should then park).
    pub fn live(self: &Arc<Self>, key: Key) -> (LiveGuard, oneshot::Receiver<()>) {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.entries().insert(
            key,
            Entry::Live {
                token,
                preempt: Some(tx),
            },
        );
        let guard = LiveGuard {
            table: self.clone(),
            key,
            token,
        };
        (guard, rx)
    }

    /// Parks `held` for `grace`: a parked slot in `sessions` (evictable
    /// at once); at the end of the grace, or when evicted, the engine
    /// session is closed unless [`Resumable::take`] took it first.
    pub fn park(
        self: &Arc<Self>,
        key: Key,
        held: Held,
        grace: Duration,
        engine: EngineService,
        sessions: &Arc<SessionTable>,
    ) {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let (cancel, cancelled) = oneshot::channel::<()>();
        let (slot, evicted) = sessions.register_parked();
        let pos = held.pos;
        self.entries().insert(
            key,
            Entry::Parked {
                token,
                held: Box::new(held),
                _cancel: cancel,
            },
        );
        tracing::debug!(session = key.1, pos, "session parked");
        let table = self.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = evicted => {}
                // Taken: the resumed session has its own slot.
                _ = cancelled => return,
            }
            let expired = {
                let mut m = table.entries();
                match m.get(&key) {
                    Some(e) if e.token() == token => m.remove(&key),
                    _ => None,
                }
            };
            if let Some(Entry::Parked { held, .. }) = expired {
                tracing::debug!(session = key.1, "parked session closed");
                let _ = engine.close(held.id).await;
                sessions.slot_freed();
            }
            drop(slot);
        });
    }

    /// The session held for `key`, if any: a parked one at once; a live
    /// one once it has parked (it is asked to), for up to
    /// [`PREEMPT_WAIT`].
    pub async fn take(&self, key: Key) -> Option<Held> {
        let deadline = Instant::now() + PREEMPT_WAIT;
        loop {
            {
                let mut m = self.entries();
                match m.get_mut(&key) {
                    None => return None,
                    Some(Entry::Parked { .. }) => {
                        return match m.remove(&key) {
                            Some(Entry::Parked { held, .. }) => Some(*held),
                            _ => None,
                        };
                    }
                    Some(Entry::Live { preempt, .. }) => {
                        if let Some(tx) = preempt.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(PREEMPT_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_history_answers_only_what_it_holds() {
        let mut h = History::new(Some(2));
        h.record_hidden(0, &[1.0, 2.0, 3.0, 4.0], 0);
        h.record_hidden(2, &[5.0, 6.0], 0);
        assert_eq!(h.hidden(0, 3), Some(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0][..]));
        assert_eq!(h.hidden(1, 1), Some(&[3.0, 4.0][..]));
        assert_eq!(h.hidden(2, 2), None);
        h.truncate(1);
        assert_eq!(h.hidden(1, 1), None);
        // A gap clears it: it must hold every position from 0.
        h.record_hidden(5, &[9.0, 9.0], 0);
        assert_eq!(h.hidden(0, 1), None);
    }

    #[test]
    fn drafted_rows_are_answered_only_once_a_step_starts_past_them() {
        let mut h = History::new(Some(1));
        h.record_hidden(0, &[1.0, 2.0], 0);
        // A verify step at 2: the token before the drafts, three drafts.
        h.record_hidden(2, &[3.0, 4.0, 5.0, 6.0], 3);
        assert_eq!(h.hidden(0, 3), Some(&[1.0, 2.0, 3.0][..]));
        assert_eq!(h.hidden(3, 1), None, "a draft is not answered from");
        // The next step starts at 5: two drafts were accepted (positions
        // 3 and 4), the third was not.
        h.confirm(5);
        h.truncate(5);
        assert_eq!(h.hidden(3, 2), Some(&[4.0, 5.0][..]));
        assert_eq!(h.hidden(5, 1), None);
        // It goes on from 5 with no gap.
        h.record_hidden(5, &[7.0], 0);
        assert_eq!(h.hidden(0, 6), Some(&[1.0, 2.0, 3.0, 4.0, 5.0, 7.0][..]));
        // A step that starts at a draft drops it and what follows.
        h.record_hidden(6, &[8.0, 9.0], 1);
        h.confirm(7);
        h.truncate(7);
        h.record_hidden(7, &[10.0], 0);
        assert_eq!(h.hidden(6, 2), Some(&[8.0, 10.0][..]));
        // Confirming past what is held confirms only what is held.
        h.confirm(100);
        assert_eq!(h.hidden(8, 1), None);
    }

    #[test]
    fn token_history_is_by_end_position() {
        let mut h = History::new(None);
        h.record_token(7, 11, [1; 32]);
        h.record_token(8, 12, [2; 32]);
        h.record_token(9, 13, [3; 32]);
        assert_eq!(h.token(8).map(|s| s.token), Some(12));
        assert_eq!(h.token(6), None);
        h.truncate(8);
        assert_eq!(h.token(9), None);
        assert_eq!(h.token(8).map(|s| s.token), Some(12));
        // A retried step replaces what was past it.
        h.record_token(8, 14, [4; 32]);
        assert_eq!(h.token(8).map(|s| s.token), Some(14));
    }
}
