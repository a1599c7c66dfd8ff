//! One chain, run once: open the session through every hop
//! ([`OpenChain::open`]), then run the steps ([`OpenChain::run`]): the
//! prompt as one prefill step, then one step per token, each token coming
//! back on the last hop's token stream.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use futures::io::WriteHalf;
use futures::{AsyncReadExt, AsyncWriteExt};
use nakshatra_swarm::protocol::act::{
    tokens_to_bytes, ActFrame, ActReply, FailureReport, HopSpec, OpenSession, StepHeader, StepKind,
    TokenFrame, ACT_PROTOCOL, MAX_DRAFT,
};
use nakshatra_swarm::{Handshake, Multiaddr, PeerId, Reopen, Stream, StreamProtocol};
use tokio::sync::mpsc;

use super::draft::AdaptiveK;
use super::inbox::TokenInbox;
use super::meters::{AskMeters, Metered, SessionGuard};
use super::verify::Tap;
use super::{AskError, AskOptions, AskTimings, Finish, HopFault};
use crate::engine::tokenizer::{Tokenizer, Utf8Stream};
use crate::net::{handshake, read_message, write_frame, FrameError};

/// How long the whole chain may take to answer `Open` with `Ready`.
pub const CHAIN_READY_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the last hop may take to open its token stream once the chain
/// is ready.
pub const TOKEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, after the token stream broke, the asker waits for a hop's
/// failure report to come up the chain before blaming the last hop.
pub const REPORT_GRACE: Duration = Duration::from_millis(500);
/// A decode step taking this many times the median one means a stalled
/// hop (see [`stall_deadline`]).
pub const STALL_FACTOR: f64 = 20.0;
/// The least a decode step is given before the chain counts as stalled
/// (scheduling hiccups on a busy host stay well below it).
pub const STALL_FLOOR: Duration = Duration::from_secs(3);
/// How long a new token stream may take to say which session it is for.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the asker waits, before opening a chain, for hole punches
/// still under way to its first and last hops. A punch takes a few round
/// trips (tens of ms on a LAN, under a second across continents) and the
/// relayed connection is closed a second later; a punch that cannot
/// succeed (a symmetric NAT) takes seconds to fail, and the chain then
/// opens on the relay after this wait.
pub const PUNCH_WAIT: Duration = Duration::from_millis(2500);

/// How a run of one chain ended.
pub(super) enum ChainOutcome<T> {
    /// The answer.
    Done(T),
    /// Failed before any token reached the user: another chain may be
    /// tried.
    NotStarted(AskError),
    /// Failed after tokens were streamed: the ask fails.
    Broken(AskError),
}

/// Where a generation stands: what was generated so far, carried from a
/// chain that broke to the one that replaces it.
#[derive(Default)]
pub(super) struct Progress {
    /// The session id, the same on every chain of this generation: a hop
    /// that survived the chain that broke resumes it (see
    /// [`OpenSession::session`]).
    pub(super) session: u64,
    /// The prompt's tokens.
    pub(super) prompt: Vec<i32>,
    /// The text so far.
    pub(super) text: String,
    /// The token ids so far.
    pub(super) tokens: Vec<i32>,
    /// The next step (0: the prefill).
    pub(super) next_step: u64,
    /// Timings (setup excluded).
    pub(super) timings: AskTimings,
    /// Why the generation ended, once it has.
    pub(super) finish: Finish,
    utf8: Utf8Stream,
    overheads_ms: Vec<f64>,
    steps_ms: Vec<f64>,
    t_decode_start: Option<Instant>,
    /// Tokens decoded after the prefill.
    decoded: usize,
    /// Speculative decoding's K and its record (`--draft`), carried
    /// across chains.
    pub(super) spec: Option<AdaptiveK>,
}

impl Progress {
    /// A generation of `prompt` that has not started.
    pub(super) fn new(prompt: Vec<i32>) -> Self {
        Progress {
            timings: AskTimings {
                prompt_tokens: prompt.len(),
                ..AskTimings::default()
            },
            prompt,
            session: rand::random(),
            ..Progress::default()
        }
    }

    /// Fills the rates and percentiles of the timings.
    pub(super) fn finish_timings(&mut self) {
        self.timings.finish(
            self.prompt.len(),
            std::mem::take(&mut self.overheads_ms),
            std::mem::take(&mut self.steps_ms),
            self.decoded,
            self.t_decode_start.map(|t| t.elapsed()),
        );
        self.timings.speculative = self.spec.as_ref().map(AdaptiveK::report);
    }
}

/// Most one-token steps a replay puts into one step. A position's logits
/// are the same bits in a batch as alone only while the batch stays small
/// (on llama.cpp's CPU kernels, up to 64 tokens in our measurements; past
/// that other kernels take over): well inside that.
pub const REPLAY_CHUNK: usize = 16;

/// One step of a replay: its first position and its input.
pub(super) struct ReplayStep {
    /// The original step this replay step ends at (its token is that
    /// step's).
    pub(super) step: u64,
    /// First position.
    pub(super) pos: u32,
    /// Input tokens.
    pub(super) input: Vec<i32>,
}

/// How to replay `steps` (original steps, numbered, with their inputs,
/// in order and back to back from position 0) into a session so that
/// every position comes out bit for bit as it did: a step of several
/// tokens (the prompt, or a replay chunk) as it was, runs of consecutive
/// one-token steps in batches of at most [`REPLAY_CHUNK`].
pub(super) fn replay_schedule(steps: &[(u64, Vec<i32>)]) -> Vec<ReplayStep> {
    let mut out: Vec<ReplayStep> = Vec::new();
    let mut pos = 0u32;
    // Whether the last replay step is a run of one-token steps.
    let mut in_run = false;
    for (step, input) in steps {
        let step = *step;
        match (out.last_mut(), input.as_slice()) {
            (Some(r), [t]) if in_run && r.step + 1 == step && r.input.len() < REPLAY_CHUNK => {
                r.input.push(*t);
                r.step = step;
            }
            _ => {
                in_run = input.len() == 1;
                out.push(ReplayStep {
                    step,
                    pos,
                    input: input.clone(),
                });
            }
        }
        pos += input.len() as u32;
    }
    out
}

/// How long a decode step may take before the chain counts as stalled:
/// [`STALL_FACTOR`] times the median decode step so far, at least
/// [`STALL_FLOOR`], at most `cap` (the user's `--step-timeout`).
fn stall_deadline(steps_ms: &[f64], cap: Duration) -> Duration {
    let mut v = steps_ms.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let median = v.get(v.len() / 2).copied().unwrap_or(0.0);
    let d = Duration::from_secs_f64(median * STALL_FACTOR / 1e3).max(STALL_FLOOR);
    d.min(cap)
}

/// What the last hop sent back for one step.
pub(super) struct StepResult {
    /// The token sampled.
    pub(super) token: i32,
    /// Engine time the hops reported, microseconds.
    pub(super) compute_us: u64,
    /// When the step's frame was written to the first hop (microseconds
    /// since the Unix epoch: the step trace's `sent`).
    pub(super) sent_us: u64,
}

/// A step's token with the digest of the logits it was sampled from
/// ([`OpenChain::step`]).
pub(super) struct Settled {
    /// The token sampled.
    pub(super) token: i32,
    /// BLAKE3 of its logits.
    pub(super) digest: [u8; 32],
}

/// Most tokens whose digests the last hop may owe at once: a step's
/// tokens (at most [`MAX_DRAFT`] + 1) until its digests come, which is
/// before the next step's first token.
const MAX_OWED_DIGESTS: usize = MAX_DRAFT + 1;

/// Why a frame from the last hop did not come.
enum ReadFailed {
    /// A hop failed (or the stream broke).
    Hop(AskError),
    /// Nothing within the step's timeout.
    Timeout(Duration),
}

impl ReadFailed {
    /// The error of step `step`.
    fn at(self, step: u64) -> AskError {
        match self {
            ReadFailed::Hop(e) => e,
            ReadFailed::Timeout(timeout) => AskError::StepTimeout { step, timeout },
        }
    }
}

/// What a resumed run's catch-up did.
pub(super) struct Replay {
    /// Tokens replayed (the prompt and every generated token but the last).
    pub(super) tokens: usize,
    /// How long it took.
    pub(super) took: Duration,
    /// Per hop, the positions it kept from the chain that broke (see
    /// [`ActReply::Ready`]): those hops answered the replay from their
    /// history and computed nothing.
    pub(super) kept: Vec<u32>,
}

/// A chain whose session is open at every hop. Dropped without
/// [`OpenChain::close`] (an ask cancelled, a client gone), it still sends
/// `Close` to hop 1, so that every hop frees the session at once instead
/// of parking it for a resume; unless a step failed: then the chain broke
/// and its hops keep their part of the session for the chain that
/// replaces it.
pub(super) struct OpenChain<'a> {
    /// Whether the asker's links run on direct streams: to the first hop,
    /// and the token stream from the last.
    pub(super) direct: [bool; 2],
    hops: &'a [HopSpec],
    /// What each hop kept of the session from an earlier chain.
    kept: Vec<u32>,
    /// Steps go to hop 1 here (`None` once closed).
    to_first: Option<WriteHalf<Metered<Stream>>>,
    /// Tokens come back here, from the last hop (`None` once dropped).
    tokens: Option<Metered<Stream>>,
    /// Failures reported upstream by any hop, as the hop to blame and
    /// its fault.
    failures: mpsc::Receiver<(u32, HopFault)>,
    /// The process's meters (step times).
    meters: AskMeters,
    /// Counts the session as open while the chain lives.
    _open: SessionGuard,
    /// A step failed: the chain broke (no `Close` on drop).
    broken: bool,
    /// Steps of tokens read whose digests have not come yet, in order.
    owed: VecDeque<u64>,
    /// Digests read and not yet taken ([`Self::take_digests`]).
    digests: Vec<(u64, [u8; 32])>,
    /// The session was opened with a ring ([`OpenSession::ring`]).
    ring: bool,
}

/// How long a chain dropped mid-answer keeps its token stream open after
/// sending `Close`, until the last hop ends it: a token the last hop
/// writes meanwhile must not find the stream gone, or it would park the
/// session for a resume nobody will ask for.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

impl Drop for OpenChain<'_> {
    fn drop(&mut self) {
        let Some(mut w) = self.to_first.take() else {
            return;
        };
        let tokens = self.tokens.take();
        if self.broken {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = write_frame(&mut w, &ActFrame::Close, &[]).await;
                let _ = w.close().await;
                if let Some(t) = tokens {
                    drain(t).await;
                }
            });
        }
    }
}

/// Reads the token stream to its end, for at most [`CLOSE_LINGER`], after
/// `Close` was sent.
async fn drain(mut t: Metered<Stream>) {
    let mut sink = [0u8; 4096];
    let read_all = async { while matches!(t.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(CLOSE_LINGER, read_all).await;
}

impl<T> ChainOutcome<T> {
    /// The answer changed by `f`; failures as they are.
    pub(super) fn map<U>(self, f: impl FnOnce(T) -> U) -> ChainOutcome<U> {
        match self {
            ChainOutcome::Done(t) => ChainOutcome::Done(f(t)),
            ChainOutcome::NotStarted(e) => ChainOutcome::NotStarted(e),
            ChainOutcome::Broken(e) => ChainOutcome::Broken(e),
        }
    }
}

impl<'a> OpenChain<'a> {
    /// Opens session `session` through `hops`: the `Open` goes to hop 1,
    /// which forwards it down the chain; once every hop is ready, the last
    /// one opens its token stream to us (taken from `incoming`).
    pub(super) async fn open(
        swarm: &nakshatra_swarm::Client,
        inbox: &TokenInbox,
        meters: &AskMeters,
        open: OpenSession,
        hops: &'a [HopSpec],
    ) -> Result<OpenChain<'a>, AskError> {
        let hop_err = |index: u32, fault: HopFault| hop_error(hops, index, fault);
        let first = hops.first().ok_or(AskError::EmptyChain)?;
        let last = hops.len() as u32 - 1;
        let first_peer: PeerId = first
            .peer_id
            .parse()
            .map_err(|_| hop_err(0, HopFault::BadPeerId))?;
        let last_peer: PeerId = hops
            .last()
            .and_then(|h| h.peer_id.parse().ok())
            .ok_or_else(|| hop_err(last, HopFault::BadPeerId))?;
        // Claimed before `Open` goes out: the last hop may open its token
        // stream as soon as it is ready.
        let mut expected = inbox.expect(open.session, last_peer);
        connect_last_hop(swarm, hops).await;
        // The asker's own links (to the first hop, from the last) carry
        // every step: a hole punch still under way would close the
        // relayed connection, and the chain's streams with it.
        let ends: Vec<PeerId> = [hops.first(), hops.last()]
            .into_iter()
            .flatten()
            .filter_map(|h| h.peer_id.parse().ok())
            .collect();
        swarm.wait_for_hole_punches(&ends, PUNCH_WAIT).await;
        let open = &open;
        let (r, to_first, kept, ring, first_direct) = swarm
            .open_link_with(
                first_peer,
                StreamProtocol::new(ACT_PROTOCOL),
                Reopen::DEFAULT,
                open.direct,
                |s| async move {
                    let direct = s.is_direct();
                    let (mut r, mut w) = Metered::new(s, meters).split();
                    if let Err(e) = write_frame(&mut w, &ActFrame::Open(open.clone()), &[]).await {
                        return Err(setup_handshake(e));
                    }
                    let ready = tokio::time::timeout(
                        CHAIN_READY_TIMEOUT,
                        read_message::<_, ActReply>(&mut r),
                    )
                    .await;
                    match ready {
                        Ok(Ok(ActReply::Ready { kept, ring })) => Ok((r, w, kept, ring, direct)),
                        Ok(Ok(ActReply::Failed(report))) => {
                            Err(Handshake::Failed(ChainSetup::Failed(report)))
                        }
                        Ok(Err(e)) => Err(setup_handshake(e)),
                        Err(_) => Err(Handshake::Failed(ChainSetup::Timeout)),
                    }
                },
            )
            .await
            .map_err(|e| match e {
                nakshatra_swarm::OpenError::Open(e) => hop_err(0, HopFault::NoStream(e)),
                nakshatra_swarm::OpenError::Handshake(ChainSetup::Failed(report)) => {
                    let (index, fault) = judge(hops, open.session, report);
                    hop_err(index, fault)
                }
                nakshatra_swarm::OpenError::Handshake(ChainSetup::Stream(e)) => {
                    hop_err(0, HopFault::Stream(e))
                }
                nakshatra_swarm::OpenError::Handshake(ChainSetup::Timeout) => {
                    hop_err(0, HopFault::Timeout(CHAIN_READY_TIMEOUT))
                }
            })?;
        let guard = SessionGuard::new(meters);
        let tokens = tokio::time::timeout(TOKEN_STREAM_TIMEOUT, expected.stream()).await;
        let Some(tokens) = tokens.ok().flatten() else {
            // The hops hold the session: end it.
            let mut w = to_first;
            let _ = write_frame(&mut w, &ActFrame::Close, &[]).await;
            let _ = w.close().await;
            return Err(hop_err(last, HopFault::NoTokenStream));
        };
        Ok(OpenChain {
            direct: [first_direct, tokens.is_direct()],
            hops,
            kept,
            to_first: Some(to_first),
            tokens: Some(Metered::new(tokens, meters)),
            failures: watch_failures(r, hops.to_vec(), open.session),
            meters: meters.clone(),
            _open: guard,
            broken: false,
            owed: VecDeque::new(),
            digests: Vec::new(),
            // Asked for, and the last hop reached hop 1.
            ring: open.ring.is_some() && ring,
        })
    }

    /// Runs the steps from where `progress` stands: the history so far
    /// (the prompt, then every token generated on earlier chains) as one
    /// step, then one token at a time until `max_tokens`, an
    /// end-of-generation token or the context `limit`. A resumed run's
    /// first step replays the history into this chain's hops (same bits as
    /// the steps that built it: see `verify`'s module doc), and
    /// `on_replay` hears how long it took. `on_text` sees the text as it
    /// comes and may end the generation (`Break`: a stop string);
    /// `tap`, when given, sees every step (for `--verify`) and can stop
    /// the run.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run(
        mut self,
        progress: &mut Progress,
        tok: &Tokenizer,
        limit: u32,
        opts: &AskOptions,
        on_text: &mut (dyn FnMut(&str) -> ControlFlow<()> + Send),
        on_replay: &mut (dyn FnMut(Replay) + Send),
        tap: Option<Tap>,
    ) -> ChainOutcome<()> {
        let n_hops = self.hops.len().max(1) as f64;
        let p = progress;
        let (mut input, mut pos) = match self.catch_up(p, tok, opts, on_replay, &tap).await {
            Ok(at) => at,
            Err(e) => return ChainOutcome::Broken(e),
        };
        p.finish = Finish::Length;
        let mut drafter = match opts.draft.as_ref().filter(|_| p.spec.is_some()) {
            Some(d) => match d.session().await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("speculative decoding off for this answer: {e}");
                    None
                }
            },
            None => None,
        };
        // The ring where the asker has no say in each step (no drafts):
        // the first step of this run goes out marked, and the chain feeds
        // itself the rest.
        let ring = self.ring && drafter.is_none();
        let mut fed = false;
        'steps: while p.next_step < u64::from(opts.max_tokens) {
            let step = p.next_step;
            if tap.as_ref().is_some_and(Tap::stopped) {
                break;
            }
            let t0 = Instant::now();
            let start_us = opts.trace.as_ref().map_or(0, |_| crate::trace::now_us());
            let timeout = if step == 0 {
                opts.step_timeout
            } else {
                stall_deadline(&p.steps_ms, opts.step_timeout)
            };
            // Drafts for a decode step: no more than the tokens still
            // wanted after this step's own, or the context holds.
            let wanted = u64::from(opts.max_tokens).saturating_sub(step + 1);
            let room = limit.saturating_sub(pos + input.len() as u32);
            let k = p
                .spec
                .as_ref()
                .map_or(0, |s| s.k())
                .min(wanted as usize)
                .min(room as usize);
            let draft = match drafter.as_mut() {
                Some(d) if step > 0 && k > 0 => {
                    let mut context = p.prompt.clone();
                    context.extend_from_slice(&p.tokens);
                    match d.propose(&context, k).await {
                        Ok(draft) => draft,
                        Err(e) => {
                            tracing::warn!(
                                "speculative decoding off for the rest of this answer: {e}"
                            );
                            drafter = None;
                            Vec::new()
                        }
                    }
                }
                _ => Vec::new(),
            };
            let draft_took = t0.elapsed();
            let mut step_input = input.clone();
            step_input.extend_from_slice(&draft);
            let t_pass = Instant::now();
            let results = if fed {
                self.ring_step(step, timeout).await.map(|r| vec![r])
            } else {
                let ring = ring && draft.is_empty();
                self.verify_step(step, pos, &step_input, &draft, ring, timeout)
                    .await
            };
            let results = match results {
                Ok(r) => r,
                Err(e) if p.tokens.is_empty() => return ChainOutcome::NotStarted(e),
                Err(e) => return ChainOutcome::Broken(e),
            };
            if fed {
                p.timings.ring_steps += 1;
            }
            fed = ring && draft.is_empty();
            let pass = t_pass.elapsed();
            // The digests of the step before, read on the way to this
            // step's tokens.
            if let Some(tap) = &tap {
                for (s, d) in self.take_digests() {
                    tap.digest(s, d);
                }
            }
            let compute_us = results.last().map_or(0, |r| r.compute_us);
            if let (Some(trace), Some(r)) = (&opts.trace, results.first()) {
                let times = crate::trace::AskTimes {
                    start: start_us,
                    sent: r.sent_us,
                    token: crate::trace::now_us(),
                };
                trace.ask(p.session, step, step_input.len() as u32, &times);
            }
            let elapsed = t0.elapsed();
            if step == 0 {
                p.timings.prefill_s = elapsed.as_secs_f64();
                p.t_decode_start = Some(Instant::now());
            } else {
                // The chain's own time: drafting on the asker is not a
                // hop's (a stall is judged, and overhead measured, on
                // the pass alone).
                p.steps_ms.push(pass.as_secs_f64() * 1e3);
                self.meters.step_seconds.observe(pass.as_secs_f64());
                let overhead = pass.as_secs_f64() * 1e3 - compute_us as f64 / 1e3;
                p.overheads_ms.push(overhead / n_hops);
                p.decoded += results.len();
                if let Some(spec) = p.spec.as_mut() {
                    spec.record(draft.len(), results.len() - 1, draft_took, pass);
                }
            }
            // Each token as the one-token step it stands for: the first
            // was fed `input`, each later one the draft before it.
            for (i, r) in results.iter().enumerate() {
                let token = r.token;
                let fed: &[i32] = match i.checked_sub(1) {
                    None => &input,
                    Some(d) => draft.get(d..=d).unwrap_or_default(),
                };
                if let Some(tap) = &tap {
                    tap.stepped(p.next_step, fed, pos + fed.len() as u32);
                }
                pos += fed.len() as u32;
                p.next_step += 1;
                // A token id from the network is checked before llama.cpp
                // renders it (an id out of range would abort the process).
                if usize::try_from(token).map_or(true, |t| t >= tok.n_vocab()) {
                    self.broken = true;
                    let e = self.hop_err(
                        self.hops.len() as u32 - 1,
                        HopFault::BadToken {
                            token,
                            n_vocab: tok.n_vocab(),
                        },
                    );
                    return if p.tokens.is_empty() {
                        ChainOutcome::NotStarted(e)
                    } else {
                        ChainOutcome::Broken(e)
                    };
                }
                if tok.is_eog(token) {
                    p.finish = Finish::Stop;
                    break 'steps;
                }
                p.tokens.push(token);
                let piece = p.utf8.push(&tok.piece(token));
                p.text.push_str(&piece);
                if on_text(&piece).is_break() {
                    p.finish = Finish::StopString;
                    break 'steps;
                }
                if pos >= limit {
                    p.finish = Finish::Context;
                    break 'steps;
                }
                input = vec![token];
            }
        }
        let rest = p.utf8.finish();
        if p.finish != Finish::StopString {
            let _ = on_text(&rest);
        }
        p.text.push_str(&rest);
        if let Some(tap) = &tap {
            // The verifier checks the last step always: its digests must
            // come.
            if let Err(e) = self.settle(opts.step_timeout).await {
                self.broken = true;
                return ChainOutcome::Broken(e);
            }
            for (s, d) in self.take_digests() {
                tap.digest(s, d);
            }
        }
        drop(tap);
        self.close().await;
        ChainOutcome::Done(())
    }

    /// A resumed run's catch-up: replays the prompt and every token
    /// generated so far but the last (see [`replay_schedule`]), checking
    /// that each replayed step samples the token it sampled before, and
    /// tells `on_replay` how many tokens and how long. Returns the input
    /// and position of the next step: the prompt at 0 for a fresh run,
    /// else the last token after the history.
    async fn catch_up(
        &mut self,
        p: &Progress,
        tok: &Tokenizer,
        opts: &AskOptions,
        on_replay: &mut (dyn FnMut(Replay) + Send),
        tap: &Option<Tap>,
    ) -> Result<(Vec<i32>, u32), AskError> {
        let Some((&last, done)) = p.tokens.split_last().filter(|_| p.next_step > 0) else {
            return Ok((p.prompt.clone(), 0));
        };
        let t0 = Instant::now();
        let mut steps = vec![(0, p.prompt.clone())];
        steps.extend((1..).zip(done.iter().map(|t| vec![*t])));
        let schedule = replay_schedule(&steps);
        let replayed = p.prompt.len() + done.len();
        let n_vocab = tok.n_vocab();
        for r in &schedule {
            let got = self
                .step(r.step, r.pos, &r.input, opts.step_timeout)
                .await?;
            if let Some(tap) = tap {
                tap.stepped(r.step, &r.input, r.pos + r.input.len() as u32);
                tap.digest(r.step, got.digest);
            }
            let want = p.tokens.get(r.step as usize).copied();
            if Some(got.token) != want {
                let last = self.hops.len() as u32 - 1;
                return Err(self.hop_err(
                    last,
                    HopFault::ReplayDiffers {
                        step: r.step,
                        token: got.token,
                        want: want.unwrap_or(-1),
                        n_vocab,
                    },
                ));
            }
        }
        on_replay(Replay {
            tokens: replayed,
            took: t0.elapsed(),
            kept: self.kept.clone(),
        });
        Ok((vec![last], replayed as u32))
    }

    /// Ends the session at every hop. In a ring the chain may be a step
    /// ahead of the asker (a stop string): the token stream is drained
    /// meanwhile, so that the last hop's write does not find it gone.
    pub(super) async fn close(mut self) {
        if let Some(mut w) = self.to_first.take() {
            let _ = write_frame(&mut w, &ActFrame::Close, &[]).await;
            let _ = w.close().await;
        }
        if self.ring {
            if let Some(t) = self.tokens.take() {
                tokio::spawn(drain(t));
            }
        }
    }

    /// One step: sends `input` at `pos` into hop 1 and waits for the token
    /// and its digest (or a failure any hop reports). A failed step marks
    /// the chain broken.
    pub(super) async fn step(
        &mut self,
        step: u64,
        pos: u32,
        input: &[i32],
        timeout: Duration,
    ) -> Result<Settled, AskError> {
        // One token for a step without drafts (checked as it was read).
        let results = self
            .verify_step(step, pos, input, &[], false, timeout)
            .await?;
        let token = results.first().map_or(-1, |r| r.token);
        let settled = self.settle(timeout).await;
        self.broken |= settled.is_err();
        settled?;
        let digest = self
            .take_digests()
            .into_iter()
            .find_map(|(s, d)| (s == step).then_some(d));
        match digest {
            Some(digest) => Ok(Settled { token, digest }),
            None => {
                self.broken = true;
                Err(self.hop_err(self.last(), HopFault::UnexpectedFrame))
            }
        }
    }

    /// Reads the digests the last hop still owes for the tokens read so
    /// far (see [`TokenFrame::Digest`]); each waits at most `timeout`.
    pub(super) async fn settle(&mut self, timeout: Duration) -> Result<(), AskError> {
        while !self.owed.is_empty() {
            let step = self.owed.front().copied().unwrap_or_default();
            match self.read_frame(timeout).await.map_err(|e| e.at(step))? {
                TokenFrame::Digest { step: s, digest } => self.owed_digest(s, digest)?,
                _ => return Err(self.hop_err(self.last(), HopFault::UnexpectedFrame)),
            }
        }
        Ok(())
    }

    /// The digests read so far and not yet taken, as (step, digest).
    pub(super) fn take_digests(&mut self) -> Vec<(u64, [u8; 32])> {
        std::mem::take(&mut self.digests)
    }

    /// Takes a digest the last hop sent: it must be for the oldest token
    /// whose digest is owed.
    fn owed_digest(&mut self, step: u64, digest: [u8; 32]) -> Result<(), AskError> {
        if self.owed.front() != Some(&step) {
            return Err(self.hop_err(self.last(), HopFault::UnexpectedFrame));
        }
        self.owed.pop_front();
        self.digests.push((step, digest));
        Ok(())
    }

    fn last(&self) -> u32 {
        self.hops.len() as u32 - 1
    }

    /// A step whose last `draft.len()` input tokens are drafts (see
    /// [`StepHeader::draft`]): the tokens the chain accepted, then its own
    /// next one (one token when `draft` is empty). `ring`: the chain feeds
    /// itself the steps after this one ([`StepHeader::ring`]). A failed
    /// step marks the chain broken.
    pub(super) async fn verify_step(
        &mut self,
        step: u64,
        pos: u32,
        input: &[i32],
        draft: &[i32],
        ring: bool,
        timeout: Duration,
    ) -> Result<Vec<StepResult>, AskError> {
        let r = self.step_once(step, pos, input, draft, ring, timeout).await;
        self.broken |= r.is_err();
        r
    }

    /// The token of step `step`, which the chain fed itself (the ring):
    /// nothing to send, its token to read. A failure marks the chain
    /// broken.
    async fn ring_step(&mut self, step: u64, timeout: Duration) -> Result<StepResult, AskError> {
        let r = self
            .read_token(step, true, timeout, crate::trace::now_us())
            .await;
        self.broken |= r.is_err();
        r
    }

    async fn step_once(
        &mut self,
        step: u64,
        pos: u32,
        input: &[i32],
        draft: &[i32],
        ring: bool,
        timeout: Duration,
    ) -> Result<Vec<StepResult>, AskError> {
        let header = StepHeader {
            step,
            pos,
            n_tokens: input.len() as u32,
            kind: StepKind::Tokens,
            compute_us: 0,
            draft: draft.to_vec(),
            ring,
        };
        let sent = match self.to_first.as_mut() {
            Some(w) => write_frame(w, &ActFrame::Step(header), &tokens_to_bytes(input)).await,
            None => Err(FrameError::Io(std::io::ErrorKind::NotConnected.into())),
        };
        sent.map_err(|e| self.hop_err(0, HopFault::Stream(e)))?;
        let sent_us = crate::trace::now_us();
        let mut out = Vec::with_capacity(draft.len() + 1);
        // The accepted drafts, then the first token that is not the
        // draft's (or the one after the last draft).
        loop {
            let r = self
                .read_token(step + out.len() as u64, out.is_empty(), timeout, sent_us)
                .await?;
            let more = draft.get(out.len()) == Some(&r.token);
            out.push(r);
            if !more {
                return Ok(out);
            }
        }
    }

    /// Reads the token of step `step` from the last hop's stream (or a
    /// failure any hop reports), taking the digests owed before it: all of
    /// them before a step's `first` token.
    async fn read_token(
        &mut self,
        step: u64,
        first: bool,
        timeout: Duration,
        sent_us: u64,
    ) -> Result<StepResult, AskError> {
        let last = self.last();
        loop {
            match self.read_frame(timeout).await.map_err(|e| e.at(step))? {
                TokenFrame::Digest { step: s, digest } => self.owed_digest(s, digest)?,
                TokenFrame::Token {
                    step: s,
                    token,
                    compute_us,
                } if s == step
                    && (!first || self.owed.is_empty())
                    && self.owed.len() < MAX_OWED_DIGESTS =>
                {
                    self.owed.push_back(s);
                    return Ok(StepResult {
                        token,
                        compute_us,
                        sent_us,
                    });
                }
                TokenFrame::Failed { message } => {
                    return Err(self.hop_err(
                        last,
                        HopFault::Reported {
                            by: last,
                            by_peer: self.peer(last),
                            message,
                        },
                    ))
                }
                _ => return Err(self.hop_err(last, HopFault::UnexpectedFrame)),
            }
        }
    }

    /// Reads one frame from the last hop's stream (or a failure any hop
    /// reports).
    async fn read_frame(&mut self, timeout: Duration) -> Result<TokenFrame, ReadFailed> {
        let last = self.last();
        let Some(tokens) = self.tokens.as_mut() else {
            let e = FrameError::Io(std::io::ErrorKind::NotConnected.into());
            return Err(ReadFailed::Hop(
                self.hop_err(last, HopFault::TokenStream(e)),
            ));
        };
        let frame = tokio::select! {
            f = tokio::time::timeout(timeout, read_message::<_, TokenFrame>(tokens)) => f,
            Some((index, fault)) = self.failures.recv() => {
                return Err(ReadFailed::Hop(self.hop_err(index, fault)));
            }
        };
        match frame {
            Ok(Ok(f)) => Ok(f),
            // The token stream broke: a hop may have said why upstream
            // (its report may be a moment behind, relayed hop by hop).
            Ok(Err(e)) => Err(ReadFailed::Hop(
                match tokio::time::timeout(REPORT_GRACE, self.failures.recv()).await {
                    Ok(Some((index, fault))) => self.hop_err(index, fault),
                    _ => self.hop_err(last, HopFault::TokenStream(e)),
                },
            )),
            Err(_) => Err(ReadFailed::Timeout(timeout)),
        }
    }

    fn hop_err(&self, index: u32, fault: HopFault) -> AskError {
        hop_error(self.hops, index, fault)
    }

    fn peer(&self, index: u32) -> String {
        peer_at(self.hops, index)
    }
}

fn peer_at(hops: &[HopSpec], index: u32) -> String {
    hops.get(index as usize)
        .map(|h| h.peer_id.clone())
        .unwrap_or_default()
}

/// Who is to blame for a failure report that came up hop 1's stream: the
/// hop it blames when it checks (see [`FailureReport::check`]), else
/// hop 1, which relayed a report nobody can stand behind.
fn judge(hops: &[HopSpec], session: u64, report: FailureReport) -> (u32, HopFault) {
    match report.check(session, hops) {
        Ok(()) if report.busy && report.blamed == report.reporter => {
            (report.blamed, HopFault::Busy(report.message))
        }
        Ok(()) => (
            report.blamed,
            HopFault::Reported {
                by: report.reporter,
                by_peer: peer_at(hops, report.reporter),
                message: report.message,
            },
        ),
        Err(e) => (0, HopFault::BadReport(e)),
    }
}

/// How the chain's set-up failed, as seen on hop 1's stream.
#[derive(Debug, thiserror::Error)]
enum ChainSetup {
    /// A hop answered `Failed` (not checked yet).
    #[error("hop {}: {}", .0.blamed, .0.message)]
    Failed(FailureReport),
    /// The stream broke.
    #[error(transparent)]
    Stream(FrameError),
    /// No answer within [`CHAIN_READY_TIMEOUT`].
    #[error("chain not ready within {CHAIN_READY_TIMEOUT:?}")]
    Timeout,
}

/// A broken stream during set-up: retried when it broke before any
/// answer (see [`handshake`]).
fn setup_handshake(e: FrameError) -> Handshake<ChainSetup> {
    match handshake(e) {
        Handshake::Dropped(e) => Handshake::Dropped(ChainSetup::Stream(e)),
        Handshake::Failed(e) => Handshake::Failed(ChainSetup::Stream(e)),
    }
}

fn hop_error(hops: &[HopSpec], index: u32, fault: HopFault) -> AskError {
    AskError::Hop {
        index,
        peer: peer_at(hops, index),
        fault,
    }
}

/// The last hop streams tokens back over our connection to it: make sure
/// there is one.
async fn connect_last_hop(swarm: &nakshatra_swarm::Client, hops: &[HopSpec]) {
    let Some(last) = hops.last() else { return };
    let Ok(peer) = last.peer_id.parse::<PeerId>() else {
        return;
    };
    let addrs: Vec<Multiaddr> = last.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    swarm.add_peer_addresses(peer, addrs).await;
    let _ = swarm.probe_rtt(peer).await;
}

/// Reads failures reported upstream on hop 1's stream, each judged
/// (see [`judge`]), until it closes (reported as a failure of hop 0).
fn watch_failures(
    mut r: futures::io::ReadHalf<Metered<Stream>>,
    hops: Vec<HopSpec>,
    session: u64,
) -> mpsc::Receiver<(u32, HopFault)> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            match read_message::<_, ActReply>(&mut r).await {
                Ok(ActReply::Failed(report)) => {
                    let _ = tx.send(judge(&hops, session, report)).await;
                }
                Ok(ActReply::Ready { .. }) => {}
                Err(e) => {
                    let _ = tx.send((0, HopFault::Stream(e))).await;
                    return;
                }
            }
        }
    });
    rx
}
