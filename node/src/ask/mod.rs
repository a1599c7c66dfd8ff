//! `node ask`, the asking side: join as a client, pick the model, plan a
//! chain over the swarm's announcements, fetch and verify the vocabulary,
//! then run the chain ([`chain`]): the prompt goes into hop 1 and tokens
//! come back from the last hop. A chain that fails before the first token
//! is planned around and another is tried.

mod chain;
pub mod draft;
pub mod inbox;
pub mod memory;
pub mod meters;
mod service;
pub mod verify;

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use nakshatra_swarm::plan::{Chain, PlanError, PlanOptions};
use nakshatra_swarm::protocol::act::{
    HopSpec, OpenSession, Ring, Sampling, WireDtype, MAX_RING_EOG,
};
use nakshatra_swarm::PeerId;
use serde::Serialize;

use crate::engine::tokenizer::{ChatMessage, Tokenizer};
use crate::engine::EngineError;
use crate::net::FrameError;
use crate::vocab::VocabError;

use chain::{ChainOutcome, OpenChain, Progress, Replay};
use memory::PeerMemory;
pub use service::{AskerConfig, AskerService};

pub use chain::{CHAIN_READY_TIMEOUT, REPLAY_CHUNK, TOKEN_STREAM_TIMEOUT};

/// Pause before the next chain after one failed to start.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long each hop of a stalled chain gets to answer a probe before it
/// counts as the hop that stalled.
pub const STALL_PROBE: Duration = Duration::from_secs(2);
/// How often a recovery with no replacement yet plans again.
const RECOVER_POLL: Duration = Duration::from_secs(1);
/// First pause after a hop said it is busy; doubled each time, up to
/// [`BUSY_PAUSE_MAX`].
const BUSY_PAUSE: Duration = Duration::from_millis(250);
/// Longest pause between two asks of a busy hop.
const BUSY_PAUSE_MAX: Duration = Duration::from_secs(4);
/// How long a hop lost mid-answer is treated as dead by this asker's
/// swarm (no dial to it: see `Client::forget_peer`), so that the
/// lookups of the repair do not wait on it.
const FORGET_LOST: Duration = Duration::from_secs(60);

/// Waiting on busy hops: pauses that double, for up to a deadline.
struct Backoff {
    deadline: Instant,
    pause: Duration,
}

impl Backoff {
    fn new(wait: Duration) -> Self {
        Backoff {
            deadline: Instant::now() + wait,
            pause: BUSY_PAUSE,
        }
    }

    /// Whether there is still time to wait.
    fn wait(&self) -> bool {
        Instant::now() + self.pause < self.deadline
    }

    /// The next pause (with jitter, so that many waiting askers do not
    /// come back at once).
    async fn sleep(&mut self) {
        let jitter = self.pause.mul_f64(rand::random::<f64>() * 0.5);
        tokio::time::sleep(self.pause + jitter).await;
        self.pause = (self.pause * 2).min(BUSY_PAUSE_MAX);
    }
}

/// Errors of `node ask`, each a clear message for the user.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The swarm could not start.
    #[error(transparent)]
    Swarm(#[from] nakshatra_swarm::SwarmError),
    /// Nobody answered.
    #[error(transparent)]
    NoPeers(#[from] nakshatra_swarm::WaitError),
    /// `--model` named no one model (or was left out where the swarm
    /// serves none, or several).
    #[error(transparent)]
    Model(#[from] nakshatra_swarm::ResolveError),
    /// No chain covers the model.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The vocabulary could not be had or did not verify.
    #[error(transparent)]
    Vocab(#[from] VocabError),
    /// No verified manifest (the model's layer count comes from it).
    #[error(transparent)]
    Manifest(#[from] crate::fetch::ManifestError),
    /// The vocabulary does not load, or has no chat template.
    #[error(transparent)]
    Tokenizer(#[from] EngineError),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The draft model (`--draft`) cannot serve this model.
    #[error(transparent)]
    Draft(#[from] draft::DraftError),
    /// The prompt does not fit.
    #[error("prompt is {tokens} tokens, longer than the context of {limit} tokens the chain's hops give a session")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Tokens one session may hold on every hop of the chain.
        limit: u32,
    },
    /// The planner returned a chain with no hop.
    #[error("the planned chain has no hop")]
    EmptyChain,
    /// A hop failed or vanished.
    #[error("hop {index} ({peer}) failed: {fault}")]
    Hop {
        /// Index in the chain.
        index: u32,
        /// Its peer id (base58).
        peer: String,
        /// What went wrong.
        fault: HopFault,
    },
    /// A step got no token in time.
    #[error("step {step} got no token within {timeout:?}")]
    StepTimeout {
        /// The step (0 is the prefill).
        step: u64,
        /// The step timeout.
        timeout: Duration,
    },
    /// A step got no token in time, and these hops no longer answer.
    #[error("step {step} got no token within {timeout:?}; silent: {}", if silent.is_empty() { "none (every hop still answers probes)".to_string() } else { silent.join(", ") })]
    Stalled {
        /// The step.
        step: u64,
        /// Its deadline.
        timeout: Duration,
        /// Peers of the chain that did not answer a probe.
        silent: Vec<String>,
    },
    /// The token stream could not be accepted.
    #[error("cannot accept token streams: {0}")]
    Accept(#[from] nakshatra_swarm::stream::AlreadyRegistered),
    /// The event loop stopped.
    #[error(transparent)]
    Stopped(#[from] nakshatra_swarm::Stopped),
    /// `--verify` was asked for but the chain cannot be checked.
    #[error("cannot verify: {0}")]
    CannotVerify(String),
    /// `--verify` found wrong results.
    #[error("verification failed at step {step}: {finding}")]
    Verify {
        /// The step whose logits differed.
        step: u64,
        /// Who lied (and was banned), or why nobody could be named.
        finding: String,
    },
}

impl AskError {
    /// Whether a hop only said it is busy (see [`HopFault::Busy`]).
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            AskError::Hop {
                fault: HopFault::Busy(_),
                ..
            }
        )
    }

    /// Whether a chain that broke this way mid-answer can be repaired
    /// (a hop was lost); a wrong result or a refusal to verify cannot.
    pub fn recoverable(&self) -> bool {
        match self {
            AskError::Hop { .. } => true,
            AskError::Stalled { silent, .. } => !silent.is_empty(),
            _ => false,
        }
    }

    /// Whether the failure is a hop's report that the stream to its next
    /// hop broke: the link, or the next hop, failed (the reporter cannot
    /// tell which).
    pub fn blames_a_link(&self) -> bool {
        matches!(self, AskError::Hop { peer, fault: HopFault::Reported { by_peer, .. }, .. } if by_peer != peer)
    }

    /// The peers a failure counts against: the hop blamed and, when a hop
    /// blamed its next one (which it cannot prove), the reporter too, so
    /// that a hop gains nothing by blaming an honest neighbour.
    pub fn charged_peers(&self) -> Vec<PeerId> {
        if let AskError::Stalled { silent, .. } = self {
            return silent.iter().filter_map(|p| p.parse().ok()).collect();
        }
        let AskError::Hop { peer, fault, .. } = self else {
            return Vec::new();
        };
        if matches!(fault, HopFault::Busy(_)) {
            return Vec::new();
        }
        let mut peers = vec![peer.as_str()];
        if let HopFault::Reported { by_peer, .. } = fault {
            if by_peer != peer {
                peers.push(by_peer);
            }
        }
        peers.iter().filter_map(|p| p.parse().ok()).collect()
    }
}

/// What went wrong at one hop.
#[derive(Debug, thiserror::Error)]
pub enum HopFault {
    /// A hop reported a failure, in a report that checks: of its own, or
    /// of its next hop (`by` is then the hop before).
    #[error("{message} (reported by hop {by})")]
    Reported {
        /// Index of the hop that signed the report.
        by: u32,
        /// Its peer id (base58).
        by_peer: String,
        /// What it said.
        message: String,
    },
    /// The hop has no session for this asker now (all its slots, or the
    /// asker's share, are taken): not a fault, the asker waits.
    #[error("busy: {0}")]
    Busy(String),
    /// Hop 1 relayed a failure report that does not check (forged, or
    /// blaming a hop its signer cannot see).
    #[error("a failure report that does not check: {0}")]
    BadReport(nakshatra_swarm::protocol::act::ReportError),
    /// The chain named a peer id that does not parse.
    #[error("bad peer id")]
    BadPeerId,
    /// No stream could be opened to it.
    #[error(transparent)]
    NoStream(#[from] nakshatra_swarm::stream::OpenStreamError),
    /// Its stream broke.
    #[error(transparent)]
    Stream(FrameError),
    /// The token stream broke.
    #[error("token stream: {0}")]
    TokenStream(FrameError),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The last hop never opened its token stream.
    #[error("the last hop never opened its token stream")]
    NoTokenStream,
    /// The token stream sent something out of turn.
    #[error("unexpected token frame")]
    UnexpectedFrame,
    /// A replay into a new chain sampled another token than the chain
    /// that broke (a hop is not computing what the model computes).
    #[error("replaying step {step} sampled token {token}, the answer so far has {want} (vocabulary of {n_vocab})")]
    ReplayDiffers {
        /// The step replayed.
        step: u64,
        /// What the replay sampled.
        token: i32,
        /// What the answer has there.
        want: i32,
        /// The vocabulary's size.
        n_vocab: usize,
    },
    /// The last hop sent a token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary (0..{n_vocab})")]
    BadToken {
        /// The id it sent.
        token: i32,
        /// The vocabulary's size.
        n_vocab: usize,
    },
}

/// What to ask, one ask at a time (the swarm it goes through is an
/// [`AskerService`]'s).
#[derive(Debug, Clone)]
pub struct AskOptions {
    /// The model: its id, its name (`smollm2:135m-q4_1`), the name's base
    /// (`smollm2`) or an id prefix of 8 or more characters; `None`: the
    /// only model in the swarm.
    pub model: Option<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling at the last hop.
    pub sampling: Sampling,
    /// Hidden-state encoding between hops.
    pub wire: WireDtype,
    /// The chain's links as direct streams where they can be (a TCP
    /// connection each, noise, no yamux); `false`: libp2p streams
    /// (`--no-direct`). See [`OpenSession::direct`].
    pub direct: bool,
    /// How long one step may take before the ask fails.
    pub step_timeout: Duration,
    /// Chains tried before giving up.
    pub attempts: u32,
    /// Fraction of steps checked on a replica chain (`--verify`; 0: off).
    pub verify: f64,
    /// How long a chain that broke mid-answer waits for a replacement of
    /// the lost blocks to appear (`--recover-wait`).
    pub recover_wait: Duration,
    /// How long to keep asking hops that say they are busy (`--busy-wait`).
    pub busy_wait: Duration,
    /// A repaired chain gets a new session id, so that no hop resumes its
    /// part of the broken chain's (test-only: the recovery benchmark's
    /// baseline; `false` in every real ask).
    pub fresh_recovery: bool,
    /// Where every decode step's timings go (`--trace-steps`), if
    /// anywhere.
    pub trace: Option<std::sync::Arc<crate::trace::StepTrace>>,
    /// Speculative decoding: the draft model and its K (`--draft`).
    pub draft: Option<draft::Draft>,
    /// Let the chain decode by itself (the ring: the last hop feeds each
    /// token to hop 1, see [`Ring`]) where the asker needs no say in each
    /// step (no `--draft`); `false`:
    /// every step from the asker (`--no-ring`).
    pub ring: bool,
}

/// The text to continue.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Messages, wrapped in the model's chat template for the assistant's
    /// reply (one user message: what `node ask` sends).
    Chat(Vec<ChatMessage>),
    /// Text tokenized as is (`--raw`, `/v1/completions`).
    Raw(String),
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The model ended it (an end-of-generation token).
    Stop,
    /// The caller's `on_text` ended it (a stop string).
    StopString,
    /// The token budget (`max_tokens`) ran out.
    #[default]
    Length,
    /// The chain's context is full.
    Context,
}

/// One hop as reported.
#[derive(Debug, Clone, Serialize)]
pub struct HopReport {
    /// Peer id (base58).
    pub peer_id: String,
    /// Layers `[start, end)`.
    pub range: [u32; 2],
    /// This asker reached the hop only through a relay when the chain
    /// opened (the `chain:` line says `(relayed)`). Links between hops are
    /// the hops' own business and not shown.
    #[serde(skip)]
    pub relayed: bool,
}

/// Timings of one ask.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AskTimings {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prefill step, seconds.
    pub prefill_s: f64,
    /// Prompt tokens per second.
    pub prefill_tps: f64,
    /// Decode steps (passes through the chain after the prefill; fewer
    /// than the tokens with `--draft`).
    pub decode_steps: usize,
    /// Decode, seconds.
    pub decode_s: f64,
    /// Decode tokens per second.
    pub decode_tps: f64,
    /// Median wall time of one decode step, milliseconds (what the asker
    /// measures its chain by).
    pub decode_step_median_ms: f64,
    /// Per-hop overhead of decode steps (wall time less the compute the
    /// hops report, over the hop count): median, milliseconds.
    pub hop_overhead_median_ms: f64,
    /// Per-hop overhead of decode steps: 99th percentile, milliseconds.
    pub hop_overhead_p99_ms: f64,
    /// Time to set up the chain (planning, vocabulary, sessions), seconds.
    pub setup_s: f64,
    /// What speculative decoding did (`--draft`; `null` without it).
    pub speculative: Option<draft::SpecReport>,
    /// The asker's own links of the chains this ask opened (to the first
    /// hop, and the last hop's token stream) that ran on direct streams.
    pub links_direct: u32,
    /// The same links that ran on libp2p streams (`--no-direct`, or no
    /// direct stream to be had).
    pub links_libp2p: u32,
    /// Decode steps the chain fed itself (the ring: the last hop sent the
    /// token to hop 1, the asker sent nothing); 0 with `--no-ring` or
    /// drafts.
    pub ring_steps: usize,
}

impl AskTimings {
    /// Fills the rates and overhead percentiles from the raw measurements.
    fn finish(
        &mut self,
        prompt: usize,
        mut overheads_ms: Vec<f64>,
        mut steps_ms: Vec<f64>,
        decoded: usize,
        decode: Option<Duration>,
    ) {
        steps_ms.sort_by(|a, b| a.total_cmp(b));
        self.decode_step_median_ms = steps_ms.get(steps_ms.len() / 2).copied().unwrap_or(0.0);
        self.prefill_tps = prompt as f64 / self.prefill_s.max(1e-9);
        self.decode_steps = overheads_ms.len();
        self.decode_s = decode.map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.decode_tps = decoded as f64 / self.decode_s.max(1e-9);
        overheads_ms.sort_by(|a, b| a.total_cmp(b));
        if !overheads_ms.is_empty() {
            let n = overheads_ms.len();
            self.hop_overhead_median_ms = overheads_ms[n / 2];
            let i = ((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1;
            self.hop_overhead_p99_ms = overheads_ms[i];
        }
    }
}

/// The result of an ask.
#[derive(Debug, Clone, Serialize)]
pub struct AskOutcome {
    /// Generated text.
    pub text: String,
    /// Generated token ids.
    pub tokens: Vec<i32>,
    /// The chain used.
    pub chain: Vec<HopReport>,
    /// The model id.
    pub model_id: String,
    /// Timings.
    pub timings: AskTimings,
    /// What `--verify` checked (`null` without it).
    pub verify: Option<verify::VerifyReport>,
    /// Chains repaired mid-answer.
    pub recoveries: Vec<Recovery>,
    /// Why the generation ended.
    pub finish: Finish,
}

/// The `chain:` line printed before the first token.
pub fn chain_line(chain: &[HopReport]) -> String {
    let hops: Vec<String> = chain
        .iter()
        .map(|h| {
            let relayed = if h.relayed { " (relayed)" } else { "" };
            format!("{} [{}..{}){relayed}", h.peer_id, h.range[0], h.range[1])
        })
        .collect();
    format!("chain: {}", hops.join(" -> "))
}

/// Runs one ask on a swarm of its own (started for it, stopped after):
/// what `node ask` does. `on_chain` sees the chain before the first
/// token; `on_text` sees the text as it is generated.
pub async fn ask(
    cfg: AskerConfig,
    opts: AskOptions,
    mut on_chain: impl FnMut(&[HopReport]) + Send,
    mut on_text: impl FnMut(&str) + Send,
    mut on_recovery: impl FnMut(&Recovery) + Send,
) -> Result<AskOutcome, AskError> {
    let t_setup = Instant::now();
    let svc = AskerService::start(cfg).await?;
    let mut text = |s: &str| {
        on_text(s);
        ControlFlow::Continue(())
    };
    let r = svc
        .ask_from(
            &opts,
            t_setup,
            AskEvents {
                chain: &mut on_chain,
                text: &mut text,
                recovery: &mut on_recovery,
            },
        )
        .await;
    svc.shutdown().await;
    r
}

/// What an ask reports as it goes.
pub struct AskEvents<'e> {
    /// The chain, before its first step (again after a repair).
    pub chain: &'e mut (dyn FnMut(&[HopReport]) + Send),
    /// Generated text, as it comes; `Break` ends the generation there
    /// (the chain is closed at once).
    pub text: &'e mut (dyn FnMut(&str) -> ControlFlow<()> + Send),
    /// A chain repaired mid-answer.
    pub recovery: &'e mut (dyn FnMut(&Recovery) + Send),
}

/// A chain that broke mid-answer and the one that took over.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// The peer that was lost (base58).
    pub lost: String,
    /// The layers it ran, `[start, end)`.
    pub range: [u32; 2],
    /// The peers now running those layers.
    pub replaced_by: Vec<String>,
    /// Tokens replayed into the new chain (prompt and generated so far).
    pub replayed_tokens: usize,
    /// The hops that kept their part of the session from the chain that
    /// broke (`peer [a..b)`): they answered the replay from their history
    /// without computing it again. The other new hops computed it.
    pub kept: Vec<String>,
    /// How long the replay took, seconds.
    pub replay_s: f64,
    /// From the failure to the answer going on again (detection not
    /// included), seconds.
    pub total_s: f64,
}

/// The `recovered:` line printed on stderr for a recovery.
pub fn recovery_line(r: &Recovery) -> String {
    format!(
        "recovered: lost {} [{}..{}), replaced by {}, replayed {} tokens in {:.2} s",
        r.lost,
        r.range[0],
        r.range[1],
        r.replaced_by.join(", "),
        r.replayed_tokens,
        r.replay_s
    )
}

/// One ask in progress.
struct Asker<'a> {
    svc: &'a service::Inner,
    swarm: &'a nakshatra_swarm::Client,
    opts: &'a AskOptions,
    t_setup: Instant,
    /// Seconds from the start to the first chain open.
    setup_s: std::sync::OnceLock<f64>,
}

/// The peers `--verify` checks a chain with.
struct VerifyPlan {
    /// One per hop: same range, another peer.
    replica: Vec<HopSpec>,
    /// One more per hop where the swarm has it (to tell a liar from its
    /// replica).
    thirds: Vec<Option<HopSpec>>,
}

/// A chain planned and ready to open, with everything its run needs.
struct Planned {
    hops: Vec<HopSpec>,
    report: Vec<HopReport>,
    tokenizer: std::sync::Arc<Tokenizer>,
    prompt: Vec<i32>,
    /// Tokens one session may hold on every hop.
    limit: u32,
    /// Each hop's announced figure, to judge the chain by.
    figures: Vec<memory::PlannedHop>,
    /// The plan's seconds per token.
    estimated: f64,
}

impl Asker<'_> {
    /// Tries up to `attempts` chains, planning around hops that failed
    /// (each failure is remembered: see [`memory`]). A chain that breaks
    /// after tokens were streamed is repaired: a new chain without the
    /// lost peer is given the history so far and the answer goes on from
    /// the step that broke.
    async fn run(&self, ev: &mut AskEvents<'_>) -> Result<AskOutcome, AskError> {
        self.swarm.wait_connected(self.svc.connect_wait).await?;
        let model_id = self.model_id().await?;
        let mut last_err = None;
        let mut progress: Option<Progress> = None;
        let mut lost: Option<Lost> = None;
        let mut recoveries = Vec::new();
        let mut failures = 0;
        let mut busy = Backoff::new(self.opts.busy_wait);
        while failures < self.opts.attempts.max(1) {
            let avoid: Vec<PeerId> = lost.iter().map(|l| l.peer).collect();
            let planned = match &lost {
                Some(l) => {
                    let p = progress.as_ref();
                    let at = p.map_or(0, |p| p.prompt.len() + p.tokens.len());
                    self.plan_recovery(&model_id, &avoid, l, at).await?
                }
                None => self.plan(&model_id, &avoid).await?,
            };
            if progress.is_none() {
                let mut p = Progress::new(planned.prompt.clone());
                if let Some(d) = &self.opts.draft {
                    match d.check_vocabulary(&planned.tokenizer, &planned.prompt) {
                        Ok(()) => p.spec = Some(draft::AdaptiveK::new(d.k)),
                        Err(e) if d.required => return Err(e.into()),
                        Err(e) => tracing::info!("no speculative decoding for this ask: {e}"),
                    }
                }
                progress = Some(p);
            }
            let p = progress.get_or_insert_with(|| Progress::new(planned.prompt.clone()));
            let mut replay = None;
            let outcome = self
                .try_chain(&model_id, &planned, p, ev, &mut |r| replay = Some(r))
                .await;
            if let Some(replay) = replay {
                if let Some(l) = lost.take() {
                    let r = l.recovered(&planned.hops, replay);
                    (ev.recovery)(&r);
                    recoveries.push(r);
                }
            }
            let e = match outcome {
                ChainOutcome::Done(report) => {
                    let mut p = progress.take().unwrap_or_default();
                    return Ok(self.outcome(&model_id, &planned, &mut p, report, recoveries));
                }
                ChainOutcome::Broken(e) if e.is_busy() && busy.wait() => {
                    tracing::warn!("{e}; asking again in a moment");
                    busy.sleep().await;
                    continue;
                }
                ChainOutcome::Broken(e) => {
                    let e = self.stalled(e, &planned.hops).await;
                    self.charge(&e);
                    match Lost::from(&e, planned) {
                        Some(mut l) if e.recoverable() => {
                            tracing::warn!("the chain broke mid-answer ({e}); repairing it");
                            l.answers = e.blames_a_link() && self.answers_probe(l.peer).await;
                            if l.answers {
                                tracing::info!(
                                    "{} still answers: the link to it broke, not the hop",
                                    l.peer
                                );
                            } else {
                                let _ = self.swarm.forget_peer(l.peer, FORGET_LOST).await;
                            }
                            if let Some(p) = progress.as_mut().filter(|_| self.opts.fresh_recovery)
                            {
                                p.session = rand::random();
                            }
                            lost = Some(l);
                            failures += 1;
                            last_err = Some(e);
                            continue;
                        }
                        _ => return Err(e),
                    }
                }
                ChainOutcome::NotStarted(e) if e.is_busy() && busy.wait() => {
                    tracing::warn!("{e}; asking again in a moment");
                    busy.sleep().await;
                    continue;
                }
                ChainOutcome::NotStarted(e) => e,
            };
            failures += 1;
            tracing::warn!("attempt {failures} failed: {e}");
            self.charge(&e);
            last_err = Some(e);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(last_err.unwrap_or(AskError::EmptyChain))
    }

    /// Whether `peer` answers an RTT probe within [`STALL_PROBE`].
    async fn answers_probe(&self, peer: PeerId) -> bool {
        tokio::time::timeout(STALL_PROBE, self.swarm.probe_rtt(peer))
            .await
            .ok()
            .flatten()
            .is_some()
    }

    /// A step that timed out: which hops of `hops` no longer answer a
    /// probe (a stalled or stopped process), so that the failure is
    /// charged to them; other errors as they are.
    async fn stalled(&self, e: AskError, hops: &[HopSpec]) -> AskError {
        let AskError::StepTimeout { step, timeout } = e else {
            return e;
        };
        let probes = hops.iter().map(|h| async move {
            let peer: PeerId = h.peer_id.parse().ok()?;
            let alive = self.answers_probe(peer).await;
            (!alive).then(|| h.peer_id.clone())
        });
        let silent: Vec<String> = futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect();
        AskError::Stalled {
            step,
            timeout,
            silent,
        }
    }

    /// The answer, once a chain finished.
    fn outcome(
        &self,
        model_id: &str,
        planned: &Planned,
        p: &mut Progress,
        verify: Option<verify::VerifyReport>,
        recoveries: Vec<Recovery>,
    ) -> AskOutcome {
        p.finish_timings();
        self.judge(planned, &p.timings);
        let mut timings = p.timings.clone();
        timings.setup_s = self.setup_s.get().copied().unwrap_or(0.0);
        AskOutcome {
            text: std::mem::take(&mut p.text),
            tokens: std::mem::take(&mut p.tokens),
            chain: planned.report.clone(),
            model_id: model_id.to_string(),
            timings,
            verify,
            recoveries,
            finish: p.finish,
        }
    }

    /// Counts a failure against the peers it names, and remembers it.
    fn charge(&self, e: &AskError) {
        let peers = e.charged_peers();
        if peers.is_empty() {
            return;
        }
        let mut m = self.memory();
        for p in &peers {
            m.failed(p);
        }
        if let Err(e) = m.save() {
            tracing::warn!("cannot save the peer memory: {e}");
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, PeerMemory> {
        self.svc
            .memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens the planned chain and runs it from where `p` stands
    /// (checked on a replica with `--verify`). `on_replay` hears of a
    /// resumed run's replay.
    async fn try_chain(
        &self,
        model_id: &str,
        planned: &Planned,
        p: &mut Progress,
        ev: &mut AskEvents<'_>,
        on_replay: &mut (dyn FnMut(Replay) + Send),
    ) -> ChainOutcome<Option<verify::VerifyReport>> {
        let check = match self.verify_plan(model_id, &planned.hops).await {
            Ok(c) => c,
            Err(e) => return ChainOutcome::Broken(e),
        };
        // The ring where the asker needs no say in each step: not with
        // drafts (the asker proposes them). With `--verify` the chain
        // rings and the tap still sees every step, token and digest in
        // order; the replica and the blame replays are driven.
        let ring = (self.opts.ring && self.opts.draft.is_none())
            .then(|| Ring {
                max_steps: u64::from(self.opts.max_tokens),
                max_pos: planned.limit,
                eog: planned.tokenizer.eog_tokens().to_vec(),
            })
            .filter(|r| r.eog.len() <= MAX_RING_EOG);
        let open = OpenSession {
            session: p.session,
            model_id: model_id.to_string(),
            hops: planned.hops.clone(),
            index: 0,
            sampling: self.opts.sampling,
            wire: self.opts.wire,
            asker: self.swarm.peer_id().to_string(),
            direct: self.opts.direct,
            ring,
        };
        let chain = match OpenChain::open(
            self.swarm,
            &self.svc.inbox,
            &self.svc.meters,
            open.clone(),
            &planned.hops,
        )
        .await
        {
            Ok(c) => c,
            Err(e) if p.tokens.is_empty() => return ChainOutcome::NotStarted(e),
            Err(e) => return ChainOutcome::Broken(e),
        };
        for direct in chain.direct {
            match direct {
                true => p.timings.links_direct += 1,
                false => p.timings.links_libp2p += 1,
            }
        }
        let _ = self.setup_s.set(self.t_setup.elapsed().as_secs_f64());
        let mut shown = planned.report.clone();
        if let Ok(via) = self.swarm.via().await {
            for h in &mut shown {
                h.relayed = h
                    .peer_id
                    .parse::<PeerId>()
                    .is_ok_and(|p| via.get(&p) == Some(&nakshatra_swarm::Via::Relay));
            }
        }
        (ev.chain)(&shown);
        let (limit, tok) = (planned.limit, &planned.tokenizer);
        let Some(c) = &check else {
            let r = chain
                .run(p, tok, limit, self.opts, ev.text, on_replay, None)
                .await;
            return r.map(|()| None);
        };
        let mut ro = open.clone();
        ro.session = rand::random();
        ro.ring = None;
        ro.hops = c.replica.clone();
        let replica = match OpenChain::open(
            self.swarm,
            &self.svc.inbox,
            &self.svc.meters,
            ro,
            &c.replica,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                let e = AskError::CannotVerify(format!("the replica chain: {e}"));
                return ChainOutcome::Broken(e);
            }
        };
        let names = c.replica.iter().map(|h| h.peer_id.clone()).collect();
        let (tap, rx, stop) = verify::tap();
        let main = chain.run(p, tok, limit, self.opts, ev.text, on_replay, Some(tap));
        let timeout = self.opts.step_timeout;
        let checked = verify::check(replica, names, self.opts.verify, rx, stop, timeout);
        let (outcome, checked) = tokio::join!(main, checked);
        match checked {
            verify::Checked::Equal(report) => outcome.map(|()| Some(report)),
            verify::Checked::Failed(e) => ChainOutcome::Broken(AskError::CannotVerify(format!(
                "the replica chain failed: {e}"
            ))),
            verify::Checked::Differs(m) => {
                ChainOutcome::Broken(self.mismatch(&open, planned, c, &m).await)
            }
        }
    }

    /// A step the replica disagreed with: names and bans the liar if the
    /// replays show one.
    async fn mismatch(
        &self,
        open: &OpenSession,
        planned: &Planned,
        c: &VerifyPlan,
        m: &verify::Mismatch,
    ) -> AskError {
        let culprit = self
            .blame(open, &planned.hops, &c.replica, &c.thirds, m)
            .await;
        let (liar, finding) = verify::finding(culprit, &planned.hops, &c.replica);
        if let Some(peer) = liar {
            let mut mem = self.memory();
            mem.ban(&peer);
            if let Err(e) = mem.save() {
                tracing::warn!("cannot save the peer memory: {e}");
            }
        }
        AskError::Verify {
            step: m.step,
            finding,
        }
    }

    /// With `--verify`: a replica for every hop, and a spare for each
    /// position (to tell a liar from its replica).
    async fn verify_plan(
        &self,
        model_id: &str,
        hops: &[HopSpec],
    ) -> Result<Option<VerifyPlan>, AskError> {
        if self.opts.verify <= 0.0 {
            return Ok(None);
        }
        let view = self
            .swarm
            .model_view(model_id)
            .await
            .map_err(|e| AskError::CannotVerify(e.to_string()))?;
        let (banned, measured) = {
            let m = self.memory();
            (m.banned(), m.measured())
        };
        let secs = |p: &nakshatra_swarm::PeerView| {
            measured
                .get(&p.peer_id)
                .copied()
                .unwrap_or(1.0 / p.throughput.max(1e-9))
        };
        let replica =
            verify::replicas(&view.peers, hops, &banned, secs).map_err(AskError::CannotVerify)?;
        let mut taken = banned.clone();
        taken.extend(
            replica
                .iter()
                .filter_map(|h| h.peer_id.parse::<PeerId>().ok()),
        );
        let thirds = hops
            .iter()
            .map(|h| {
                verify::replicas(&view.peers, std::slice::from_ref(h), &taken, secs)
                    .ok()
                    .and_then(|mut v| v.pop())
            })
            .collect();
        Ok(Some(VerifyPlan { replica, thirds }))
    }

    /// Measures the chain against its plan and remembers what it learnt.
    fn judge(&self, planned: &Planned, t: &AskTimings) {
        let step = t.decode_step_median_ms / 1e3;
        let mut m = self.memory();
        let verdict = m.judge(&planned.figures, planned.estimated, step, t.decode_steps);
        if let memory::Verdict::UnderDelivered {
            measured,
            estimated,
        } = verdict
        {
            tracing::warn!(
                "the chain took {:.1} ms per token, planned {:.1} ms: its hops are marked slower for later asks",
                measured * 1e3,
                estimated * 1e3
            );
        }
        if verdict != memory::Verdict::TooShort {
            if let Err(e) = m.save() {
                tracing::warn!("cannot save the peer memory: {e}");
            }
        }
    }

    /// The id of the model asked for (an id, a name, a name's base or an
    /// id prefix: [`nakshatra_swarm::SwarmView::resolve`]), or of the only
    /// one the swarm serves.
    async fn model_id(&self) -> Result<String, AskError> {
        let name = self.opts.model.as_deref();
        if let Some(id) = name.and_then(nakshatra_swarm::whole_model_id) {
            // A whole id needs no view.
            return Ok(id);
        }
        let view = self.swarm.swarm_view().await?;
        Ok(view.resolve(name)?)
    }

    /// Plans a chain without the `exclude`d peers (with them, when they
    /// are the only way through), then gets the vocabulary from its hops
    /// and tokenizes the prompt. A chain with a hop whose context cannot
    /// hold the prompt is planned again around such hops.
    async fn plan(&self, model_id: &str, avoid: &[PeerId]) -> Result<Planned, AskError> {
        let mut chain = self.plan_around(model_id, 0, avoid).await?;
        // The vocabulary: from the last hop first, then the chain's other
        // hops, then anyone else serving the model (a hop may refuse).
        let mut peers: Vec<PeerId> = chain.hops.iter().rev().map(|h| h.peer_id).collect();
        for p in self.swarm.model_peers(model_id).await.unwrap_or_default() {
            if !peers.contains(&p) {
                peers.push(p);
            }
        }
        let tokenizer = self.svc.tokenizer(model_id, &peers).await?;
        let text = match &self.opts.prompt {
            Prompt::Raw(t) => t.clone(),
            Prompt::Chat(messages) => tokenizer.chat_messages(messages)?,
        };
        let prompt = tokenizer.tokenize(&text);
        if prompt.is_empty() {
            return Err(AskError::EmptyPrompt);
        }
        if prompt.len() > context_limit(&chain) as usize {
            let tokens = prompt.len();
            let needed = u32::try_from(tokens).unwrap_or(u32::MAX);
            match self.plan_around(model_id, needed, avoid).await {
                Ok(c) => {
                    tracing::info!(
                        "planned around hops whose context cannot hold the {tokens}-token prompt"
                    );
                    chain = c;
                }
                Err(_) => {
                    return Err(AskError::PromptTooLong {
                        tokens,
                        limit: context_limit(&chain),
                    })
                }
            }
        }
        Ok(planned_from(chain, tokenizer, prompt))
    }

    /// The fastest chain whose hops each hold `min_context` tokens, by the
    /// figures this node measured where it has them (announced ones
    /// elsewhere), going round peers that failed lately.
    async fn plan_around(
        &self,
        model_id: &str,
        min_context: u32,
        avoid: &[PeerId],
    ) -> Result<Chain, AskError> {
        self.plan_keeping(model_id, min_context, avoid, Vec::new())
            .await
    }

    /// [`Asker::plan_around`] for a chain that keeps the hops `keep`.
    async fn plan_keeping(
        &self,
        model_id: &str,
        min_context: u32,
        avoid: &[PeerId],
        keep: Vec<(PeerId, [u32; 2])>,
    ) -> Result<Chain, AskError> {
        // The layer count and architecture come from the verified manifest
        // (cached after the first time), never from a vote of announcers.
        let shape = crate::fetch::model_shape(self.swarm, model_id, &self.svc.data_dir).await?;
        let plan_opts = {
            let m = self.memory();
            PlanOptions {
                min_context,
                shape: Some(shape),
                measured: m.measured(),
                penalty: m.penalty(),
                exclude: m
                    .banned()
                    .into_iter()
                    .chain(avoid.iter().copied())
                    .collect(),
                keep,
                ..PlanOptions::default()
            }
        };
        Ok(self.swarm.plan(model_id, &plan_opts).await?)
    }
}

impl Asker<'_> {
    /// A chain without the peer that was `lost` (and the other `avoid`ed
    /// ones), holding `at` tokens so far: at once if the swarm has one,
    /// else as soon as one appears, for up to `--recover-wait`; then the
    /// planner's error, naming the blocks nobody else serves.
    async fn plan_recovery(
        &self,
        model_id: &str,
        avoid: &[PeerId],
        lost: &Lost,
        at: usize,
    ) -> Result<Planned, AskError> {
        let deadline = Instant::now() + self.opts.recover_wait;
        loop {
            let mut r = self.repair(model_id, avoid, lost, at).await;
            if matches!(r, Err(AskError::Plan(_))) && lost.answers {
                // Nobody else holds its blocks, and it still answers: ask
                // it again over a new link.
                tracing::info!(
                    "no other peer serves [{}..{}); keeping {}, which still answers",
                    lost.range[0],
                    lost.range[1],
                    lost.peer
                );
                let rest: Vec<PeerId> =
                    avoid.iter().filter(|p| **p != lost.peer).copied().collect();
                r = self.repair(model_id, &rest, lost, at).await;
            }
            match r {
                Err(AskError::Plan(e)) if Instant::now() < deadline => {
                    tracing::warn!(
                        "no replacement for {} [{}..{}) yet ({e}); waiting",
                        lost.peer,
                        lost.range[0],
                        lost.range[1]
                    );
                    tokio::time::sleep(RECOVER_POLL).await;
                }
                r => return r,
            }
        }
    }

    /// One try at a chain that replaces the `lost` hop: the other hops of
    /// the broken chain are kept (their sessions are resumed, with their
    /// KV) and only the lost blocks are planned; where no peer fits those
    /// blocks exactly, the whole chain is planned again (see
    /// [`PlanOptions::keep`]). The vocabulary and prompt of the broken
    /// chain are reused.
    async fn repair(
        &self,
        model_id: &str,
        avoid: &[PeerId],
        lost: &Lost,
        at: usize,
    ) -> Result<Planned, AskError> {
        let need = u32::try_from(at + 1).unwrap_or(u32::MAX);
        let keep: Vec<(PeerId, [u32; 2])> = lost
            .before
            .hops
            .iter()
            .filter_map(|h| Some((h.peer_id.parse::<PeerId>().ok()?, [h.start, h.end])))
            .filter(|(p, _)| !avoid.contains(p))
            .collect();
        let chain = self.plan_keeping(model_id, need, avoid, keep).await?;
        let before = &lost.before;
        Ok(planned_from(
            chain,
            before.tokenizer.clone(),
            before.prompt.clone(),
        ))
    }
}

/// The peer a broken chain lost.
struct Lost {
    peer: PeerId,
    /// Its layers in the chain.
    range: [u32; 2],
    /// When the loss was seen.
    at: Instant,
    /// The chain that broke (its vocabulary and prompt are the new one's).
    before: Planned,
    /// It was blamed for its link only (by the hop before it) and still
    /// answered a probe: where nobody else serves its blocks, the repair
    /// keeps it rather than wait for a replacement that may never come.
    answers: bool,
}

impl Lost {
    /// The peer `e` names (the hop blamed, or the first that went silent),
    /// and its range in the chain `before`.
    fn from(e: &AskError, before: Planned) -> Option<Lost> {
        let name = match e {
            AskError::Hop { peer, .. } => peer.clone(),
            AskError::Stalled { silent, .. } => silent.first()?.clone(),
            _ => return None,
        };
        let hop = before.hops.iter().find(|h| h.peer_id == name)?;
        Some(Lost {
            peer: name.parse().ok()?,
            range: [hop.start, hop.end],
            at: Instant::now(),
            before,
            answers: false,
        })
    }

    /// The recovery, now that the chain `hops` caught up (`replay`).
    fn recovered(&self, hops: &[HopSpec], replay: Replay) -> Recovery {
        let span = |h: &HopSpec| format!("{} [{}..{})", h.peer_id, h.start, h.end);
        Recovery {
            lost: self.peer.to_string(),
            range: self.range,
            replaced_by: hops
                .iter()
                .filter(|h| h.start < self.range[1] && h.end > self.range[0])
                .map(span)
                .collect(),
            replayed_tokens: replay.tokens,
            kept: hops
                .iter()
                .zip(&replay.kept)
                .filter(|(_, &k)| k > 0)
                .map(|(h, _)| span(h))
                .collect(),
            replay_s: replay.took.as_secs_f64(),
            total_s: self.at.elapsed().as_secs_f64(),
        }
    }
}

/// A planned chain, with the vocabulary and prompt it runs.
fn planned_from(chain: Chain, tokenizer: std::sync::Arc<Tokenizer>, prompt: Vec<i32>) -> Planned {
    let hops = hop_specs(&chain);
    let report = hops
        .iter()
        .map(|h| HopReport {
            peer_id: h.peer_id.clone(),
            range: [h.start, h.end],
            relayed: false,
        })
        .collect();
    let figures = chain
        .hops
        .iter()
        .map(|h| memory::PlannedHop {
            peer: h.peer_id,
            announced_secs: 1.0 / h.throughput,
        })
        .collect();
    Planned {
        hops,
        report,
        tokenizer,
        prompt,
        limit: context_limit(&chain),
        figures,
        estimated: chain.est_secs_per_token,
    }
}

/// Tokens one session may hold on every hop of `chain`.
fn context_limit(chain: &Chain) -> u32 {
    chain
        .hops
        .iter()
        .map(|h| h.context_per_session)
        .min()
        .unwrap_or(0)
}

fn hop_specs(chain: &Chain) -> Vec<HopSpec> {
    chain
        .hops
        .iter()
        .map(|h| HopSpec {
            peer_id: h.peer_id.to_string(),
            start: h.start,
            end: h.end,
            addrs: h.addrs.iter().map(ToString::to_string).collect(),
        })
        .collect()
}
