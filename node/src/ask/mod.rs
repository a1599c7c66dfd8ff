//! `node ask`, the asking side: join as a client, pick the model, plan a
//! chain over the swarm's announcements, fetch and verify the vocabulary,
//! then run the chain ([`chain`]): the prompt goes into hop 1 and tokens
//! come back from the last hop. A chain that fails before the first token
//! is planned around and another is tried.

mod chain;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nakshatra_swarm::plan::{Chain, PlanError, PlanOptions};
use nakshatra_swarm::protocol::act::{HopSpec, OpenSession, Sampling, WireDtype, TOKENS_PROTOCOL};
use nakshatra_swarm::{Multiaddr, PeerId, StreamProtocol, SwarmConfig};
use serde::Serialize;

use crate::datadir::DataDir;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::EngineError;
use crate::net::FrameError;
use crate::vocab::VocabError;

use chain::{ChainOutcome, OpenChain};

pub use chain::{CHAIN_READY_TIMEOUT, TOKEN_STREAM_TIMEOUT};

/// Pause before the next chain after one failed to start.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Failures after which a hop is planned around (a single transport
/// hiccup is retried as is).
const FAILURES_TO_EXCLUDE: u32 = 2;

/// Errors of `node ask`, each a clear message for the user.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The swarm could not start.
    #[error(transparent)]
    Swarm(#[from] nakshatra_swarm::SwarmError),
    /// Nobody answered.
    #[error(transparent)]
    NoPeers(#[from] nakshatra_swarm::WaitError),
    /// No model is announced at all.
    #[error("no model is announced in this swarm")]
    NoModel,
    /// Several models, and `--model` did not pick one.
    #[error("the swarm serves several models; pick one with --model: {}", .0.join(", "))]
    SeveralModels(Vec<String>),
    /// No chain covers the model.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The vocabulary could not be had or did not verify.
    #[error(transparent)]
    Vocab(#[from] VocabError),
    /// The vocabulary does not load, or has no chat template.
    #[error(transparent)]
    Tokenizer(#[from] EngineError),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
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
    /// The token stream could not be accepted.
    #[error("cannot accept token streams: {0}")]
    Accept(#[from] nakshatra_swarm::stream::AlreadyRegistered),
    /// The event loop stopped.
    #[error(transparent)]
    Stopped(#[from] nakshatra_swarm::Stopped),
}

/// What went wrong at one hop.
#[derive(Debug, thiserror::Error)]
pub enum HopFault {
    /// The hop (or the one it names) reported a failure.
    #[error("{0}")]
    Reported(String),
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
    /// The last hop sent a token id outside the vocabulary.
    #[error("token id {token} is outside the vocabulary (0..{n_vocab})")]
    BadToken {
        /// The id it sent.
        token: i32,
        /// The vocabulary's size.
        n_vocab: usize,
    },
}

/// What to ask.
#[derive(Debug, Clone)]
pub struct AskOptions {
    /// Peers to bootstrap from.
    pub bootstrap: Vec<Multiaddr>,
    /// mDNS on the LAN.
    pub mdns: bool,
    /// Model id; `None`: the only model in the swarm.
    pub model: Option<String>,
    /// The prompt.
    pub prompt: String,
    /// Tokenize the prompt as is, without the chat template.
    pub raw: bool,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling at the last hop.
    pub sampling: Sampling,
    /// Hidden-state encoding between hops.
    pub wire: WireDtype,
    /// The vocabulary cache lives here.
    pub data_dir: DataDir,
    /// How long to wait for a first peer.
    pub connect_wait: Duration,
    /// How long one step may take before the ask fails.
    pub step_timeout: Duration,
    /// Chains tried before giving up.
    pub attempts: u32,
}

/// One hop as reported.
#[derive(Debug, Clone, Serialize)]
pub struct HopReport {
    /// Peer id (base58).
    pub peer_id: String,
    /// Layers `[start, end)`.
    pub range: [u32; 2],
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
    /// Decode steps.
    pub decode_steps: usize,
    /// Decode, seconds.
    pub decode_s: f64,
    /// Decode tokens per second.
    pub decode_tps: f64,
    /// Per-hop overhead of decode steps (wall time less the compute the
    /// hops report, over the hop count): median, milliseconds.
    pub hop_overhead_median_ms: f64,
    /// Per-hop overhead of decode steps: 99th percentile, milliseconds.
    pub hop_overhead_p99_ms: f64,
    /// Time to set up the chain (planning, vocabulary, sessions), seconds.
    pub setup_s: f64,
}

impl AskTimings {
    /// Fills the rates and overhead percentiles from the raw measurements.
    fn finish(&mut self, prompt: usize, mut overheads_ms: Vec<f64>, decode: Option<Duration>) {
        self.prefill_tps = prompt as f64 / self.prefill_s.max(1e-9);
        self.decode_steps = overheads_ms.len();
        self.decode_s = decode.map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.decode_tps = self.decode_steps as f64 / self.decode_s.max(1e-9);
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
}

/// The `chain:` line printed before the first token.
pub fn chain_line(chain: &[HopReport]) -> String {
    let hops: Vec<String> = chain
        .iter()
        .map(|h| format!("{} [{}..{})", h.peer_id, h.range[0], h.range[1]))
        .collect();
    format!("chain: {}", hops.join(" -> "))
}

/// Runs one ask. `on_chain` sees the chain before the first token;
/// `on_text` sees the text as it is generated.
pub async fn ask(
    opts: AskOptions,
    mut on_chain: impl FnMut(&[HopReport]),
    mut on_text: impl FnMut(&str),
) -> Result<AskOutcome, AskError> {
    let t_setup = Instant::now();
    let mut cfg = SwarmConfig::client();
    cfg.bootstrap = opts.bootstrap.clone();
    cfg.mdns = opts.mdns;
    let key = nakshatra_swarm::IdentityKeypair::generate_ed25519();
    let (swarm, task) = nakshatra_swarm::spawn(key, cfg).await?;
    let r = Asker {
        swarm: &swarm,
        opts: &opts,
        t_setup,
    }
    .run(&mut on_chain, &mut on_text)
    .await;
    let _ = swarm.shutdown().await;
    let _ = task.await;
    r
}

/// One ask in progress.
struct Asker<'a> {
    swarm: &'a nakshatra_swarm::Client,
    opts: &'a AskOptions,
    t_setup: Instant,
}

/// A chain planned and ready to open, with everything its run needs.
struct Planned {
    hops: Vec<HopSpec>,
    report: Vec<HopReport>,
    tokenizer: Tokenizer,
    prompt: Vec<i32>,
    /// Tokens one session may hold on every hop.
    limit: u32,
}

impl Asker<'_> {
    /// Tries up to `attempts` chains, planning around hops that failed.
    async fn run(
        &self,
        on_chain: &mut impl FnMut(&[HopReport]),
        on_text: &mut impl FnMut(&str),
    ) -> Result<AskOutcome, AskError> {
        let mut incoming = self
            .swarm
            .stream_control()
            .accept(StreamProtocol::new(TOKENS_PROTOCOL))?;
        self.swarm.wait_connected(self.opts.connect_wait).await?;
        let model_id = self.model_id().await?;
        let mut exclude: Vec<PeerId> = Vec::new();
        let mut failures: HashMap<PeerId, u32> = HashMap::new();
        let mut last_err = None;
        for attempt in 0..self.opts.attempts.max(1) {
            let planned = self.plan(&model_id, &mut exclude).await?;
            let e = match self
                .try_chain(&model_id, planned, &mut incoming, on_chain, on_text)
                .await
            {
                ChainOutcome::Done(outcome) => return Ok(outcome),
                ChainOutcome::Broken(e) => return Err(e),
                ChainOutcome::NotStarted(e) => e,
            };
            tracing::warn!("attempt {} failed: {e}", attempt + 1);
            if let AskError::Hop { peer, .. } = &e {
                if let Ok(p) = peer.parse::<PeerId>() {
                    let n = failures.entry(p).or_insert(0);
                    *n += 1;
                    if *n >= FAILURES_TO_EXCLUDE {
                        exclude.push(p);
                    }
                }
            }
            last_err = Some(e);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(last_err.unwrap_or(AskError::EmptyChain))
    }

    /// Opens the planned chain and runs it.
    async fn try_chain(
        &self,
        model_id: &str,
        planned: Planned,
        incoming: &mut nakshatra_swarm::stream::IncomingStreams,
        on_chain: &mut impl FnMut(&[HopReport]),
        on_text: &mut impl FnMut(&str),
    ) -> ChainOutcome<AskOutcome> {
        let open = OpenSession {
            session: rand::random(),
            model_id: model_id.to_string(),
            hops: planned.hops.clone(),
            index: 0,
            sampling: self.opts.sampling,
            wire: self.opts.wire,
            asker: self.swarm.peer_id().to_string(),
        };
        let chain = match OpenChain::open(self.swarm, incoming, open, &planned.hops).await {
            Ok(c) => c,
            Err(e) => return ChainOutcome::NotStarted(e),
        };
        let setup_s = self.t_setup.elapsed().as_secs_f64();
        on_chain(&planned.report);
        let p = &planned;
        chain
            .run(&p.prompt, &p.tokenizer, p.limit, self.opts, on_text)
            .await
            .map(|mut g| {
                g.timings.setup_s = setup_s;
                AskOutcome {
                    text: g.text,
                    tokens: g.tokens,
                    chain: planned.report.clone(),
                    model_id: model_id.to_string(),
                    timings: g.timings,
                }
            })
    }

    /// The model asked for, or the only one the swarm serves.
    async fn model_id(&self) -> Result<String, AskError> {
        if let Some(m) = &self.opts.model {
            return Ok(m.clone());
        }
        let view = self.swarm.swarm_view().await?;
        match view.models.as_slice() {
            [] => Err(AskError::NoModel),
            [m] => Ok(m.id.clone()),
            many => Err(AskError::SeveralModels(
                many.iter().map(|m| m.id.clone()).collect(),
            )),
        }
    }

    /// Plans a chain without the `exclude`d peers (with them, when they
    /// are the only way through), then gets the vocabulary from its hops
    /// and tokenizes the prompt. A chain with a hop whose context cannot
    /// hold the prompt is planned again around such hops.
    async fn plan(&self, model_id: &str, exclude: &mut Vec<PeerId>) -> Result<Planned, AskError> {
        let mut chain = self.plan_around(model_id, exclude, 0).await?;
        // The vocabulary: from the last hop first, then the chain's other
        // hops, then anyone else serving the model (a hop may refuse).
        let mut peers: Vec<PeerId> = chain.hops.iter().rev().map(|h| h.peer_id).collect();
        for p in self.swarm.model_peers(model_id).await.unwrap_or_default() {
            if !peers.contains(&p) {
                peers.push(p);
            }
        }
        let vocab = crate::vocab::fetch(self.swarm, &peers, model_id, &self.opts.data_dir).await?;
        let tokenizer = Tokenizer::load(&vocab)?;
        let text = if self.opts.raw {
            self.opts.prompt.clone()
        } else {
            tokenizer.chat_prompt(&self.opts.prompt)?
        };
        let prompt = tokenizer.tokenize(&text);
        if prompt.is_empty() {
            return Err(AskError::EmptyPrompt);
        }
        if prompt.len() > context_limit(&chain) as usize {
            let tokens = prompt.len();
            let needed = u32::try_from(tokens).unwrap_or(u32::MAX);
            match self.plan_around(model_id, exclude, needed).await {
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
        let hops = hop_specs(&chain);
        let report = hops
            .iter()
            .map(|h| HopReport {
                peer_id: h.peer_id.clone(),
                range: [h.start, h.end],
            })
            .collect();
        Ok(Planned {
            hops,
            report,
            tokenizer,
            prompt,
            limit: context_limit(&chain),
        })
    }

    /// The fastest chain whose hops each hold `min_context` tokens, without
    /// the `exclude`d peers unless they are the only way through.
    async fn plan_around(
        &self,
        model_id: &str,
        exclude: &mut Vec<PeerId>,
        min_context: u32,
    ) -> Result<Chain, AskError> {
        let plan_opts = PlanOptions {
            exclude: exclude.iter().copied().collect(),
            min_context,
            ..PlanOptions::default()
        };
        match self.swarm.plan(model_id, &plan_opts).await {
            Ok(c) => Ok(c),
            // Planning around the hops that failed leaves a gap: they are
            // the only way through, so they get another chance.
            Err(e) if !exclude.is_empty() => {
                tracing::warn!("no chain without the peers that failed ({e}); trying them again");
                exclude.clear();
                let opts = PlanOptions {
                    min_context,
                    ..PlanOptions::default()
                };
                Ok(self.swarm.plan(model_id, &opts).await?)
            }
            Err(e) => Err(e.into()),
        }
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
