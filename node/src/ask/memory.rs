//! What `node ask` remembers about the peers it used, from one ask to the
//! next (`peers.json` in the data dir): the seconds per token a peer was
//! measured at, and its recent failures. The planner takes a measured
//! figure over an announced one and goes round peers that failed lately
//! (`PlanOptions::{measured, penalty}`), so a peer that lies about its
//! speed, or keeps failing, loses the traffic its announcements drew.
//!
//! # What can be measured
//!
//! Hidden states go hop to hop, so the asker sees one time per decode
//! step for the whole chain, `T`, against the plan's estimate `E` (the
//! figures it planned with plus the links). A chain that under-delivers
//! by far ([`UNDER_DELIVERY_FACTOR`], [`UNDER_DELIVERY_SLACK`]) holds at
//! least one hop slower than its figure; which one cannot be seen, so
//! every hop `i` is charged what it would take if all the others kept
//! their figures: `max(figure_i, T - (E - figure_i))`. That is exact for a
//! one-hop chain (the liar that announces the whole model), an upper bound
//! for the others; an honest hop charged for a slow neighbour is cleared
//! by the next chain it serves that delivers (its figure drops back to the
//! announced one), and every figure expires after [`MEASURE_TTL`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nakshatra_swarm::protocol::now_ms;
use nakshatra_swarm::PeerId;
use serde::{Deserialize, Serialize};

/// How long a measured figure is trusted; then the announced one is used
/// again (the peer may have been busy, or upgraded).
pub const MEASURE_TTL: Duration = Duration::from_secs(30 * 60);
/// How long a failure is remembered (for the backoff to grow on the next).
pub const FAILURE_TTL: Duration = Duration::from_secs(10 * 60);
/// How long a peer is gone round after its first failure; doubled for
/// each further failure remembered (Petals: 15 s, doubling), up to
/// [`FAILURE_TTL`].
pub const BACKOFF: Duration = Duration::from_secs(15);
/// Seconds per token added to a peer's cost per recent failure: far more
/// than any real hop takes, so the planner goes round it whenever another
/// chain exists, and still uses it when it is the only way through.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(10);
/// A chain under-delivers when its decode steps take more than this many
/// times the plan's estimate (plus [`UNDER_DELIVERY_SLACK`]): noise on a
/// busy host stays well within it, a liar does not.
pub const UNDER_DELIVERY_FACTOR: f64 = 3.0;
/// Absolute slack on top of [`UNDER_DELIVERY_FACTOR`] (scheduling jitter
/// matters most on fast chains).
pub const UNDER_DELIVERY_SLACK: Duration = Duration::from_millis(20);
/// Decode steps an ask needs before its chain is judged.
pub const MIN_STEPS_TO_JUDGE: usize = 3;
/// How long a peer caught returning wrong results (`--verify`) is left
/// out of every chain.
pub const BAN_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Peers remembered at most (the oldest entries go first).
pub const MAX_PEERS: usize = 4096;
/// Largest memory file read; a bigger one is ignored (and replaced).
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// One peer's record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Entry {
    /// Measured seconds per token through its range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secs_per_token: Option<f64>,
    /// When `secs_per_token` was measured (unix ms).
    #[serde(default)]
    measured_at_ms: u64,
    /// Failures counted against it since `failed_at_ms - FAILURE_TTL`.
    #[serde(default)]
    failures: u32,
    /// Its last failure (unix ms).
    #[serde(default)]
    failed_at_ms: u64,
    /// Caught returning wrong results at this time (unix ms): left out of
    /// chains for [`BAN_TTL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    banned_at_ms: Option<u64>,
}

impl Entry {
    fn measured(&self, now: u64) -> Option<f64> {
        let fresh = now.saturating_sub(self.measured_at_ms) < MEASURE_TTL.as_millis() as u64;
        self.secs_per_token
            .filter(|s| fresh && s.is_finite() && *s >= 0.0)
    }

    fn failures(&self, now: u64) -> u32 {
        let fresh = now.saturating_sub(self.failed_at_ms) < FAILURE_TTL.as_millis() as u64;
        if fresh {
            self.failures
        } else {
            0
        }
    }

    fn banned(&self, now: u64) -> bool {
        self.banned_at_ms
            .is_some_and(|t| now.saturating_sub(t) < BAN_TTL.as_millis() as u64)
    }

    /// Whether the peer is in its backoff after its last failure.
    fn backing_off(&self, now: u64) -> bool {
        let n = self.failures(now);
        if n == 0 {
            return false;
        }
        let backoff = BACKOFF
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(FAILURE_TTL);
        now.saturating_sub(self.failed_at_ms) < backoff.as_millis() as u64
    }

    fn last_seen(&self) -> u64 {
        self.measured_at_ms
            .max(self.failed_at_ms)
            .max(self.banned_at_ms.unwrap_or(0))
    }
}

/// One hop of a chain as planned, for [`PeerMemory::judge`].
#[derive(Debug, Clone)]
pub struct PlannedHop {
    /// The peer.
    pub peer: PeerId,
    /// Seconds per token its announcement claims (1 / throughput).
    pub announced_secs: f64,
}

/// How a chain did against its plan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Too few decode steps to tell.
    TooShort,
    /// Within [`UNDER_DELIVERY_FACTOR`] of the estimate.
    Delivered,
    /// Far slower than planned: its hops were charged.
    UnderDelivered {
        /// Measured seconds per decode step.
        measured: f64,
        /// The plan's estimate.
        estimated: f64,
    },
}

/// The remembered figures (see the module doc).
#[derive(Debug)]
pub struct PeerMemory {
    path: PathBuf,
    peers: HashMap<String, Entry>,
}

impl PeerMemory {
    /// The memory kept at `path`; empty when there is none yet, and when
    /// the file is unreadable, too big or not ours (it is replaced at the
    /// next save: a memory is a cache, never a reason to fail an ask).
    pub fn load(path: &Path) -> Self {
        let peers = match read_bounded(path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring {}: {e}", path.display());
                HashMap::new()
            }),
            Ok(None) => HashMap::new(),
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", path.display());
                HashMap::new()
            }
        };
        PeerMemory {
            path: path.to_path_buf(),
            peers,
        }
    }

    /// Fresh measured seconds per token, for `PlanOptions::measured`.
    pub fn measured(&self) -> HashMap<PeerId, f64> {
        let now = now_ms();
        self.peers
            .iter()
            .filter_map(|(p, e)| Some((p.parse().ok()?, e.measured(now)?)))
            .collect()
    }

    /// Seconds added per peer in its backoff after a failure (see
    /// [`BACKOFF`]), for `PlanOptions::penalty`.
    pub fn penalty(&self) -> HashMap<PeerId, f64> {
        let now = now_ms();
        self.peers
            .iter()
            .filter(|(_, e)| e.backing_off(now))
            .filter_map(|(p, e)| {
                let n = e.failures(now);
                Some((p.parse().ok()?, n as f64 * FAILURE_PENALTY.as_secs_f64()))
            })
            .collect()
    }

    /// Peers banned now, for `PlanOptions::exclude`.
    pub fn banned(&self) -> std::collections::HashSet<PeerId> {
        let now = now_ms();
        self.peers
            .iter()
            .filter(|(_, e)| e.banned(now))
            .filter_map(|(p, _)| p.parse().ok())
            .collect()
    }

    /// Bans `peer` for [`BAN_TTL`] (it returned wrong results).
    pub fn ban(&mut self, peer: &PeerId) {
        self.peers.entry(peer.to_string()).or_default().banned_at_ms = Some(now_ms());
    }

    /// Counts one failure against `peer`.
    pub fn failed(&mut self, peer: &PeerId) {
        let now = now_ms();
        let e = self.peers.entry(peer.to_string()).or_default();
        e.failures = e.failures(now).saturating_add(1);
        e.failed_at_ms = now;
    }

    /// Judges a chain that ran: `hops` as planned, `estimated` the plan's
    /// seconds per token (links included), `step_secs` the measured
    /// median decode step over `steps` steps. Updates the hops' figures
    /// (see the module doc).
    pub fn judge(
        &mut self,
        hops: &[PlannedHop],
        estimated: f64,
        step_secs: f64,
        steps: usize,
    ) -> Verdict {
        if steps < MIN_STEPS_TO_JUDGE || !step_secs.is_finite() || !estimated.is_finite() {
            return Verdict::TooShort;
        }
        let now = now_ms();
        let limit = UNDER_DELIVERY_FACTOR * estimated + UNDER_DELIVERY_SLACK.as_secs_f64();
        let under = step_secs > limit;
        for h in hops {
            let e = self.peers.entry(h.peer.to_string()).or_default();
            let before = e.measured(now);
            let figure = before.unwrap_or(h.announced_secs);
            // What this hop took if every other kept its figure.
            let implied = step_secs - (estimated - figure);
            let new = if under {
                Some(figure.max(implied))
            } else {
                before.map(|b| b.min(h.announced_secs.max(implied)))
            };
            if let Some(s) = new.filter(|s| s.is_finite()) {
                e.secs_per_token = Some(s);
                e.measured_at_ms = now;
            }
        }
        if under {
            Verdict::UnderDelivered {
                measured: step_secs,
                estimated,
            }
        } else {
            Verdict::Delivered
        }
    }

    /// Writes the memory (atomically), without expired entries and at most
    /// [`MAX_PEERS`] of them, the most recent kept.
    pub fn save(&mut self) -> std::io::Result<()> {
        let now = now_ms();
        self.peers
            .retain(|_, e| e.measured(now).is_some() || e.failures(now) > 0 || e.banned(now));
        if self.peers.len() > MAX_PEERS {
            let mut by_age: Vec<(u64, String)> = self
                .peers
                .iter()
                .map(|(p, e)| (e.last_seen(), p.clone()))
                .collect();
            by_age.sort_unstable();
            let extra = self.peers.len() - MAX_PEERS;
            for (_, p) in by_age.into_iter().take(extra) {
                self.peers.remove(&p);
            }
        }
        let bytes = serde_json::to_vec_pretty(&self.peers).map_err(std::io::Error::other)?;
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::datadir::write_atomic(&self.path, &bytes)
    }
}

/// The file's bytes, `None` when there is none; an error when it is
/// bigger than [`MAX_FILE_BYTES`] or unreadable.
fn read_bounded(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE_BYTES} bytes"
        )));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(peer: PeerId, tps: f64) -> PlannedHop {
        PlannedHop {
            peer,
            announced_secs: 1.0 / tps,
        }
    }

    #[test]
    fn a_liar_is_measured_and_an_honest_neighbour_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        let (liar, honest) = (PeerId::random(), PeerId::random());
        let mut m = PeerMemory::load(&path);
        // The liar alone: exact.
        let v = m.judge(&[hop(liar, 50_000.0)], 0.002, 0.25, 10);
        assert!(matches!(v, Verdict::UnderDelivered { .. }), "{v:?}");
        let got = m.measured()[&liar];
        assert!(
            (got - (0.25 - 0.002 + 1.0 / 50_000.0)).abs() < 1e-9,
            "{got}"
        );
        // An honest hop behind a slow neighbour is charged too...
        m.judge(&[hop(liar, 50_000.0), hop(honest, 100.0)], 0.3, 2.0, 10);
        assert!(m.measured()[&honest] > 1.0);
        // ...and cleared by a chain that delivers.
        let v = m.judge(&[hop(honest, 100.0)], m.measured()[&honest], 0.011, 10);
        assert_eq!(v, Verdict::Delivered);
        assert!((m.measured()[&honest] - 0.011).abs() < 1e-9);
        // Too few steps: nothing learnt.
        assert_eq!(
            m.judge(&[hop(honest, 100.0)], 0.01, 9.0, 2),
            Verdict::TooShort
        );
        // Remembered across loads; failures add penalties.
        m.failed(&honest);
        m.failed(&honest);
        m.save().unwrap();
        let m2 = PeerMemory::load(&path);
        assert_eq!(m2.measured(), m.measured());
        assert_eq!(m2.penalty()[&honest], 2.0 * FAILURE_PENALTY.as_secs_f64());
        assert!(!m2.penalty().contains_key(&liar));
        // A ban is remembered too.
        let mut m2 = m2;
        m2.ban(&liar);
        m2.save().unwrap();
        assert!(PeerMemory::load(&path).banned().contains(&liar));
    }

    #[test]
    fn a_bad_file_is_ignored_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.json");
        std::fs::write(&path, b"{ not json").unwrap();
        assert!(PeerMemory::load(&path).measured().is_empty());
        std::fs::write(&path, vec![b' '; MAX_FILE_BYTES as usize + 1]).unwrap();
        let mut m = PeerMemory::load(&path);
        assert!(m.penalty().is_empty());
        m.failed(&PeerId::random());
        m.save().unwrap();
        assert_eq!(PeerMemory::load(&path).penalty().len(), 1);
    }
}
