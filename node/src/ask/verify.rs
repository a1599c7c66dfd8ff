//! `node ask --verify RATE`: checks the chain's results on a replica.
//!
//! On one build and backend a slice computes bit for bit what the whole
//! model computes, so a second chain given the same tokens must give the
//! same logits, and any difference is a hop returning wrong results.
//!
//! # How
//!
//! - **Replica.** For every hop of the chain, another peer serving exactly
//!   the same range on the same backend class (not banned, best figures
//!   first). Without a replica for every hop the ask fails with
//!   [`AskError::CannotVerify`].
//! - **Sampled steps.** Each step is checked with probability `RATE`
//!   (the last one always). The chain's last hop sends a logits digest
//!   with every token and the replica runs concurrently with the chain,
//!   so no hop can tell which steps are checked. At a checked step the
//!   replica catches up on every step since its last check and the
//!   digests of each catch-up step's last position are compared with the
//!   chain's for the same step.
//! - **Same bits, fewer steps.** The replica must hold the same KV cache,
//!   so it computes every position the chain computes, but not one step
//!   per token: the prompt goes in as the one step it was, and runs of
//!   one-token steps in batches of up to `REPLAY_CHUNK` (llama.cpp's CPU
//!   kernels give a position the same bits in such a batch as alone;
//!   past about 64 tokens other kernels take over and the bits change;
//!   `node/tests/exactness.rs` guards it). A lower `RATE` means fewer,
//!   larger catch-ups: less per-step overhead on the replica, the same
//!   positions computed. GPU backends pick kernels by batch size, so
//!   verification is offered on CPU hops only, for now.
//! - **Blame.** On a mismatch the chain stops, and hop by hop the asker
//!   runs hybrids: the chain with hop `i` replaced by its replica,
//!   replayed up to the step that differed. If exactly one hybrid agrees
//!   with the replica, that chain hop lied; if every hybrid but one agrees
//!   with the chain, that replica hop lied. The liar is banned by this
//!   node ([`super::memory`]) and named in the error; when the hybrids do
//!   not single one out (several liars, or one that lies only sometimes),
//!   nobody is banned and the error says so.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nakshatra_swarm::protocol::act::{HopSpec, OpenSession};
use nakshatra_swarm::{PeerId, PeerView};
use serde::Serialize;
use tokio::sync::mpsc;

use super::chain::OpenChain;
use super::{AskError, Asker};

/// The backend whose kernels are batch-invariant (see the module doc).
pub const VERIFIABLE_BACKEND: &str = "CPU";

/// One step of the chain, as the verifier sees it.
pub(super) struct Stepped {
    /// The chain's step number.
    step: u64,
    /// The tokens the step put in.
    input: Vec<i32>,
    /// Position after the step.
    end: u32,
    /// The chain's logits digest for it (`None`: its chain broke before
    /// the digest came; the step is replayed on the replica, not
    /// compared).
    digest: Option<[u8; 32]>,
}

/// The chain's side of the verifier: every step goes in with its digest
/// (which the last hop sends after the token); a mismatch stops the
/// chain.
pub(super) struct Tap {
    tx: mpsc::UnboundedSender<Stepped>,
    stop: Arc<AtomicBool>,
    /// Steps whose digests have not come yet, in order.
    waiting: Mutex<VecDeque<Stepped>>,
}

impl Tap {
    /// Whether the verifier wants the chain to stop.
    pub(super) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// One step the chain ran: it goes to the verifier with its digest
    /// ([`Self::digest`]).
    pub(super) fn stepped(&self, step: u64, input: &[i32], end: u32) {
        self.waiting().push_back(Stepped {
            step,
            input: input.to_vec(),
            end,
            digest: None,
        });
    }

    /// The digest of step `step`: the step goes to the verifier. Steps
    /// before it still waiting go without a digest: digests come in
    /// order, so their chain broke before theirs came.
    pub(super) fn digest(&self, step: u64, digest: [u8; 32]) {
        let mut waiting = self.waiting();
        while let Some(mut s) = waiting.pop_front() {
            let found = s.step == step;
            if found {
                s.digest = Some(digest);
            }
            let _ = self.tx.send(s);
            if found {
                return;
            }
        }
    }

    fn waiting(&self) -> MutexGuard<'_, VecDeque<Stepped>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What `--verify` found, for the report and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Steps checked against the replica.
    pub checked: usize,
    /// Steps the chain ran.
    pub steps: usize,
    /// The replica's peers, one per hop.
    pub replica: Vec<String>,
}

/// A step where the chain and the replica differ.
#[derive(Debug, Clone)]
pub(super) struct Mismatch {
    /// The chain's step.
    pub(super) step: u64,
    /// Every step (number, input) up to and including that one.
    pub(super) steps: Vec<(u64, Vec<i32>)>,
    /// The chain's digest.
    pub(super) main: [u8; 32],
    /// The replica's.
    pub(super) replica: [u8; 32],
}

/// How checking went.
pub(super) enum Checked {
    /// Every checked step was equal.
    Equal(VerifyReport),
    /// A step differed.
    Differs(Mismatch),
    /// The replica failed.
    Failed(AskError),
}

/// Who lied, as far as the hybrids show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Culprit {
    /// The chain's hop at this index.
    Chain(usize),
    /// The replica's hop at this index.
    Replica(usize),
    /// The hybrids do not single one out.
    Unknown,
}

/// A replica for each hop of `main` among `peers`: the same range, another
/// peer (not in the chain, not `banned`), the verifiable backend, a free
/// session; the best figure first (`secs` of a peer: lower is better).
pub(super) fn replicas(
    peers: &[PeerView],
    main: &[HopSpec],
    banned: &std::collections::HashSet<PeerId>,
    secs: impl Fn(&PeerView) -> f64,
) -> Result<Vec<HopSpec>, String> {
    let in_chain: Vec<&str> = main.iter().map(|h| h.peer_id.as_str()).collect();
    let mut out = Vec::new();
    for h in main {
        let best = peers
            .iter()
            .filter(|p| {
                p.range == [h.start, h.end]
                    && p.free_sessions > 0
                    && p.backend == VERIFIABLE_BACKEND
                    && !banned.contains(&p.peer_id)
                    && !in_chain.contains(&p.peer_id.to_string().as_str())
            })
            .min_by(|a, b| secs(a).total_cmp(&secs(b)));
        let Some(p) = best else {
            return Err(format!(
                "no other peer serves layers {}..{} on {VERIFIABLE_BACKEND} to check the chain against",
                h.start, h.end
            ));
        };
        out.push(HopSpec {
            peer_id: p.peer_id.to_string(),
            start: h.start,
            end: h.end,
            addrs: p.listen_addrs.clone(),
        });
    }
    Ok(out)
}

/// The tap for the chain and the receiving end for [`check`].
pub(super) fn tap() -> (Tap, mpsc::UnboundedReceiver<Stepped>, Arc<AtomicBool>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    (
        Tap {
            tx,
            stop: stop.clone(),
            waiting: Mutex::new(VecDeque::new()),
        },
        rx,
        stop,
    )
}

/// Runs the replica alongside the chain (see the module doc) until the
/// chain's tap closes or a step differs.
pub(super) async fn check(
    mut replica: OpenChain<'_>,
    replica_peers: Vec<String>,
    rate: f64,
    mut rx: mpsc::UnboundedReceiver<Stepped>,
    stop: Arc<AtomicBool>,
    timeout: std::time::Duration,
) -> Checked {
    // Every step so far (inputs), and the steps not yet given to the
    // replica.
    let mut inputs: Vec<(u64, Vec<i32>)> = Vec::new();
    let mut queue: Vec<Stepped> = Vec::new();
    let mut checked = 0usize;
    loop {
        let next = rx.recv().await;
        let closing = next.is_none();
        if let Some(s) = next {
            inputs.push((s.step, s.input.clone()));
            let sampled = rand::random::<f64>() < rate;
            queue.push(s);
            if !sampled {
                continue;
            }
        }
        if queue.is_empty() {
            break;
        }
        // The replica catches up on the queued steps, in the shapes that
        // give the same bits (see `replay_schedule`); every replay step's
        // last position is an original step's, whose digest is known.
        let steps: Vec<(u64, Vec<i32>)> = queue.iter().map(|s| (s.step, s.input.clone())).collect();
        let base = queue[0].end - queue[0].input.len() as u32;
        for r in super::chain::replay_schedule(&steps) {
            let got = match replica.step(r.step, base + r.pos, &r.input, timeout).await {
                Ok(g) => g,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Checked::Failed(e);
                }
            };
            checked += 1;
            let Some(s) = queue.iter().find(|s| s.step == r.step) else {
                continue;
            };
            if s.digest.is_some_and(|d| d != got.digest) {
                stop.store(true, Ordering::Relaxed);
                replica.close().await;
                let upto = inputs
                    .iter()
                    .position(|(n, _)| *n == s.step)
                    .map_or(0, |i| i + 1);
                return Checked::Differs(Mismatch {
                    step: s.step,
                    steps: inputs.get(..upto).unwrap_or_default().to_vec(),
                    main: s.digest.unwrap_or_default(),
                    replica: got.digest,
                });
            }
        }
        queue.clear();
        if closing {
            break;
        }
    }
    replica.close().await;
    Checked::Equal(VerifyReport {
        checked,
        steps: inputs.len(),
        replica: replica_peers,
    })
}

/// The one position the chain and the replica differ at, from the
/// hybrids' digests (`hybrids[i]`: the chain with hop `i` replaced by its
/// replica, `None` where it could not be run): the hybrid at that
/// position gives the replica's result, every other the chain's. `None`
/// when the hybrids show no single position (several liars, a liar honest
/// in replays, a hybrid that did not run).
pub(super) fn position(
    main: &[u8; 32],
    replica: &[u8; 32],
    hybrids: &[Option<[u8; 32]>],
) -> Option<usize> {
    let differs: Vec<usize> = (0..hybrids.len())
        .filter(|&i| hybrids[i].as_ref() != Some(main))
        .collect();
    match differs[..] {
        [i] if hybrids[i].as_ref() == Some(replica) => Some(i),
        _ => None,
    }
}

/// At a position the hybrids singled out, which side lied: a third peer
/// for that position (the chain with its hop there replaced by the third)
/// sides with the replica (the chain's hop lied) or with the chain (the
/// replica's hop lied).
pub(super) fn side(
    position: usize,
    main: &[u8; 32],
    replica: &[u8; 32],
    third: Option<[u8; 32]>,
) -> Culprit {
    match third {
        Some(d) if d == *replica => Culprit::Chain(position),
        Some(d) if d == *main => Culprit::Replica(position),
        _ => Culprit::Unknown,
    }
}

/// What to tell the user about `culprit`, and the peer to ban.
pub(super) fn finding(
    culprit: Culprit,
    chain: &[HopSpec],
    replica: &[HopSpec],
) -> (Option<PeerId>, String) {
    let peer_at = |hops: &[HopSpec], i: usize| -> String {
        hops.get(i).map(|h| h.peer_id.clone()).unwrap_or_default()
    };
    let (peer, text) = match culprit {
        Culprit::Chain(i) => {
            let peer = peer_at(chain, i);
            let t = format!("hop {i} ({peer}) of the chain returned wrong results; banned");
            (peer, t)
        }
        Culprit::Replica(i) => {
            let peer = peer_at(replica, i);
            let t = format!(
                "the replica of hop {i} ({peer}) returned wrong results; banned (the chain may \
                 have been right: ask again)"
            );
            (peer, t)
        }
        Culprit::Unknown => (
            String::new(),
            "the chain and its replica differ, and the replays do not single out one hop; \
             nobody banned"
                .to_string(),
        ),
    };
    (peer.parse().ok(), text)
}

impl Asker<'_> {
    /// The digest of a fresh session on `hops` given the step inputs
    /// `steps` (replayed in shapes that give the same bits), or `None`
    /// when that chain cannot be run.
    pub(super) async fn replay(
        &self,
        open: &OpenSession,
        hops: &[HopSpec],
        steps: &[(u64, Vec<i32>)],
    ) -> Option<[u8; 32]> {
        let mut o = open.clone();
        o.session = rand::random();
        o.hops = hops.to_vec();
        // Replays send every step themselves.
        o.ring = None;
        let mut chain = OpenChain::open(self.swarm, &self.svc.inbox, &self.svc.meters, o, hops)
            .await
            .ok()?;
        let mut last = None;
        for r in super::chain::replay_schedule(steps) {
            match chain
                .step(r.step, r.pos, &r.input, self.opts.step_timeout)
                .await
            {
                Ok(g) => last = Some(g.digest),
                Err(_) => {
                    last = None;
                    break;
                }
            }
        }
        chain.close().await;
        last
    }

    /// Runs the hybrids for a mismatch between `main` and `replica`, then
    /// a third peer at the position they single out (one of `thirds`, a
    /// spare for each position), and names the liar if they show one.
    pub(super) async fn blame(
        &self,
        open: &OpenSession,
        main: &[HopSpec],
        replica: &[HopSpec],
        thirds: &[Option<HopSpec>],
        m: &Mismatch,
    ) -> Culprit {
        let mut hybrids = Vec::new();
        for i in 0..main.len() {
            let mut hops = main.to_vec();
            if let Some(r) = replica.get(i) {
                hops[i] = r.clone();
            }
            hybrids.push(self.replay(open, &hops, &m.steps).await);
        }
        let Some(i) = position(&m.main, &m.replica, &hybrids) else {
            return Culprit::Unknown;
        };
        let Some(Some(third)) = thirds.get(i) else {
            return Culprit::Unknown;
        };
        let mut hops = main.to_vec();
        hops[i] = third.clone();
        let d = self.replay(open, &hops, &m.steps).await;
        side(i, &m.main, &m.replica, d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrids_and_a_third_peer_name_the_liar_or_nobody() {
        let (good, bad, other) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        // One liar at position 1 (in the chain or in the replica: the
        // hybrids alone cannot tell which)...
        let h = [Some(bad), Some(good), Some(bad)];
        assert_eq!(position(&bad, &good, &h), Some(1));
        // ...a third peer there sides with the replica: the chain's hop.
        assert_eq!(side(1, &bad, &good, Some(good)), Culprit::Chain(1));
        assert_eq!(side(1, &good, &bad, Some(good)), Culprit::Replica(1));
        assert_eq!(side(1, &good, &bad, Some(other)), Culprit::Unknown);
        assert_eq!(side(1, &good, &bad, None), Culprit::Unknown);
        // Two liars (no clean hybrid), a hybrid that did not run, a liar
        // honest in replays (every hybrid agrees with the replica): no
        // position.
        let h = [Some(other), Some(other), Some(bad)];
        assert_eq!(position(&bad, &good, &h), None);
        let h = [Some(good), None];
        assert_eq!(position(&bad, &good, &h), None);
        let h = [Some(good), Some(good)];
        assert_eq!(position(&bad, &good, &h), None);
    }
}
