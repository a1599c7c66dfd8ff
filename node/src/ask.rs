//! The asking side: join as a client, plan a chain over the swarm's
//! announcements, fetch and verify the vocabulary, push the prompt into hop
//! 1 and read tokens from the last hop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use nakshatra_swarm::plan::{Chain, PlanError, PlanOptions};
use nakshatra_swarm::protocol::act::{
    tokens_to_bytes, ActFrame, ActReply, HopSpec, OpenSession, Sampling, StepHeader, StepKind,
    TokenFrame, VocabRequest, VocabResponse, WireDtype, ACT_PROTOCOL, TOKENS_PROTOCOL,
    VOCAB_PROTOCOL,
};
use nakshatra_swarm::{Multiaddr, PeerId, StreamProtocol, SwarmConfig};
use serde::Serialize;

use crate::engine::tokenizer::{Tokenizer, Utf8Stream};
use crate::net::{read_frame, write_frame};

/// Errors of `node ask`, each a clear message for the user.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The swarm could not start.
    #[error(transparent)]
    Swarm(#[from] nakshatra_swarm::SwarmError),
    /// Nobody answered.
    #[error("no peer reachable within {0:?}: check --bootstrap (or the LAN, for mDNS)")]
    NoPeers(Duration),
    /// No model, or several and none chosen.
    #[error("{0}")]
    Model(String),
    /// No chain covers the model.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The vocabulary could not be had or did not verify.
    #[error("vocabulary: {0}")]
    Vocab(String),
    /// The prompt does not fit.
    #[error("prompt is {tokens} tokens, longer than the context of {limit} tokens the chain's hops give a session")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Context per session.
        limit: u32,
    },
    /// A hop failed or vanished.
    #[error("hop {index} ({peer}) failed: {message}")]
    Hop {
        /// Index in the chain.
        index: u32,
        /// Its peer id.
        peer: String,
        /// Why.
        message: String,
    },
    /// No answer in time.
    #[error("{0}")]
    Timeout(String),
    /// Local problem (tokenizer, files).
    #[error("{0}")]
    Local(String),
    /// The event loop stopped.
    #[error("the swarm event loop stopped")]
    Stopped,
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
    /// No chat template.
    pub raw: bool,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling at the last hop.
    pub sampling: Sampling,
    /// Hidden-state encoding between hops.
    pub wire: WireDtype,
    /// Data dir (vocabulary cache).
    pub data_dir: PathBuf,
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
    /// Peer id.
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
    /// Per-hop overhead of decode steps: median, milliseconds.
    pub hop_overhead_median_ms: f64,
    /// Per-hop overhead of decode steps: 99th percentile, milliseconds.
    pub hop_overhead_p99_ms: f64,
    /// Time to set up the chain (planning, vocabulary, sessions), seconds.
    pub setup_s: f64,
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

/// The `chain:` line printed before the first token.
pub fn chain_line(chain: &[HopReport]) -> String {
    let hops: Vec<String> = chain
        .iter()
        .map(|h| format!("{} [{}..{})", h.peer_id, h.range[0], h.range[1]))
        .collect();
    format!("chain: {}", hops.join(" -> "))
}

/// The model's vocabulary-only GGUF, verified against `model_id`: from the
/// data dir's cache, else from `peers` (first that verifies).
pub async fn fetch_vocab(
    swarm: &nakshatra_swarm::Client,
    peers: &[PeerId],
    model_id: &str,
    data_dir: &Path,
) -> Result<PathBuf, AskError> {
    let dir = data_dir.join("vocab");
    let path = dir.join(format!("{model_id}.gguf"));
    let hashes_path = dir.join(format!("{model_id}.hashes"));
    if let (Ok(bytes), Ok(h)) = (std::fs::read(&path), std::fs::read(&hashes_path)) {
        let ok = nakshatra_swarm::protocol::decode::<nakshatra_slicer::ModelHashes>(&h, 1 << 24)
            .ok()
            .is_some_and(|hashes| {
                nakshatra_slicer::verify_vocab(&bytes, model_id, &hashes).is_ok()
            });
        if ok {
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "cached vocabulary does not verify; fetching again");
    }
    let mut last = String::from("no serving peer to ask");
    for peer in peers {
        let req = VocabRequest {
            model_id: model_id.to_string(),
        };
        let got = crate::net::request(swarm, *peer, VOCAB_PROTOCOL, &req, Duration::from_secs(30))
            .await
            .and_then(|answer| match answer {
                (VocabResponse::Vocab { hashes }, payload) => Ok((hashes, payload)),
                (VocabResponse::NotHere, _) => Err("peer has no vocabulary to give".to_string()),
            });
        let (hashes_bytes, gguf) = match got {
            Ok(v) => v,
            Err(e) => {
                last = format!("{peer}: {e}");
                continue;
            }
        };
        let hashes: nakshatra_slicer::ModelHashes =
            match nakshatra_swarm::protocol::decode(&hashes_bytes, 1 << 24) {
                Ok(h) => h,
                Err(e) => {
                    last = format!("{peer}: bad hashes: {e}");
                    continue;
                }
            };
        if let Err(e) = nakshatra_slicer::verify_vocab(&gguf, model_id, &hashes) {
            tracing::warn!(%peer, "vocabulary does not verify against the model id: {e}");
            last = format!("{peer}: {e}");
            continue;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| AskError::Local(format!("{}: {e}", dir.display())))?;
        let write = |p: &Path, b: &[u8]| {
            crate::fetch::write_atomic(p, b).map_err(|e| AskError::Local(e.to_string()))
        };
        write(&path, &gguf)?;
        write(&hashes_path, &hashes_bytes)?;
        return Ok(path);
    }
    Err(AskError::Vocab(last))
}

async fn wait_for_peers(swarm: &nakshatra_swarm::Client, wait: Duration) -> Result<(), AskError> {
    let t0 = Instant::now();
    loop {
        if !swarm
            .connected_peers()
            .await
            .map_err(|_| AskError::Stopped)?
            .is_empty()
        {
            return Ok(());
        }
        if t0.elapsed() > wait {
            return Err(AskError::NoPeers(wait));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let r = ask_on(&swarm, &opts, t_setup, &mut on_chain, &mut on_text).await;
    let _ = swarm.shutdown().await;
    let _ = task.await;
    r
}

async fn ask_on(
    swarm: &nakshatra_swarm::Client,
    opts: &AskOptions,
    t_setup: Instant,
    on_chain: &mut impl FnMut(&[HopReport]),
    on_text: &mut impl FnMut(&str),
) -> Result<AskOutcome, AskError> {
    let mut control = swarm.stream_control();
    let mut incoming = control
        .accept(StreamProtocol::new(TOKENS_PROTOCOL))
        .map_err(|e| AskError::Local(e.to_string()))?;
    wait_for_peers(swarm, opts.connect_wait).await?;

    let model_id = match &opts.model {
        Some(m) => m.clone(),
        None => {
            let view = swarm.swarm_view().await.map_err(|_| AskError::Stopped)?;
            match view.models.as_slice() {
                [] => {
                    return Err(AskError::Model(
                        "no model is announced in this swarm".into(),
                    ))
                }
                [m] => m.id.clone(),
                many => {
                    let ids: Vec<&str> = many.iter().map(|m| m.id.as_str()).collect();
                    return Err(AskError::Model(format!(
                        "the swarm serves several models; pick one with --model: {}",
                        ids.join(", ")
                    )));
                }
            }
        }
    };

    let mut exclude: Vec<PeerId> = Vec::new();
    let mut failures: std::collections::HashMap<PeerId, u32> = std::collections::HashMap::new();
    let mut last_err = None;
    for attempt in 0..opts.attempts.max(1) {
        let plan_opts = PlanOptions {
            exclude: exclude.iter().copied().collect(),
            ..PlanOptions::default()
        };
        let chain = match swarm.plan(&model_id, &plan_opts).await {
            Ok(c) => c,
            // Planning around the hops that failed leaves a gap: they are
            // the only way through, so they get another chance.
            Err(e) if !exclude.is_empty() => {
                tracing::warn!("no chain without the peers that failed ({e}); trying them again");
                exclude.clear();
                swarm.plan(&model_id, &PlanOptions::default()).await?
            }
            Err(e) => return Err(e.into()),
        };
        let hops = hop_specs(&chain);
        let report: Vec<HopReport> = hops
            .iter()
            .map(|h| HopReport {
                peer_id: h.peer_id.clone(),
                range: [h.start, h.end],
            })
            .collect();
        // The vocabulary: from the last hop first, then the others.
        let mut peers: Vec<PeerId> = chain.hops.iter().rev().map(|h| h.peer_id).collect();
        peers.dedup();
        let vocab = fetch_vocab(swarm, &peers, &model_id, &opts.data_dir).await?;
        let tok = Tokenizer::load(&vocab).map_err(|e| AskError::Vocab(e.to_string()))?;
        let text = if opts.raw {
            opts.prompt.clone()
        } else {
            tok.chat_prompt(&opts.prompt)
                .map_err(|e| AskError::Local(e.to_string()))?
        };
        let prompt = tok.tokenize(&text);
        if prompt.is_empty() {
            return Err(AskError::Local("the prompt is empty".into()));
        }
        let limit = chain
            .hops
            .iter()
            .map(|h| h.context_per_session)
            .min()
            .unwrap_or(0);
        if prompt.len() > limit as usize {
            return Err(AskError::PromptTooLong {
                tokens: prompt.len(),
                limit,
            });
        }
        match run_chain(
            swarm,
            &mut incoming,
            opts,
            &model_id,
            &hops,
            &report,
            &prompt,
            limit,
            &tok,
            t_setup,
            on_chain,
            on_text,
        )
        .await
        {
            Ok(o) => return Ok(o),
            // Before any token is out, a broken hop means: plan around it.
            Err((e, false)) => {
                tracing::warn!("attempt {} failed: {e}", attempt + 1);
                // A hop that failed twice (or refused outright) is planned
                // around; a single transport hiccup is retried as is.
                if let AskError::Hop { peer, .. } = &e {
                    if let Ok(p) = peer.parse::<PeerId>() {
                        let n = failures.entry(p).or_insert(0u32);
                        *n += 1;
                        if *n >= 2 {
                            exclude.push(p);
                        }
                    }
                }
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err((e, true)) => return Err(e),
        }
    }
    Err(last_err.unwrap_or(AskError::Stopped))
}

#[allow(clippy::too_many_arguments)]
async fn run_chain(
    swarm: &nakshatra_swarm::Client,
    incoming: &mut nakshatra_swarm::stream::IncomingStreams,
    opts: &AskOptions,
    model_id: &str,
    hops: &[HopSpec],
    report: &[HopReport],
    prompt: &[i32],
    limit: u32,
    tok: &Tokenizer,
    t_setup: Instant,
    on_chain: &mut impl FnMut(&[HopReport]),
    on_text: &mut impl FnMut(&str),
) -> Result<AskOutcome, (AskError, bool)> {
    let first = hops
        .first()
        .ok_or((AskError::Model("empty chain".into()), false))?;
    let hop_err = |index: u32, message: String| AskError::Hop {
        index,
        peer: hops
            .get(index as usize)
            .map(|h| h.peer_id.clone())
            .unwrap_or_default(),
        message,
    };
    let first_peer: PeerId = first
        .peer_id
        .parse()
        .map_err(|_| (hop_err(0, "bad peer id".into()), false))?;
    // The last hop streams tokens back over our connection to it: make sure
    // there is one.
    if let Some(last) = hops.last().and_then(|h| h.peer_id.parse::<PeerId>().ok()) {
        let addrs: Vec<Multiaddr> = hops
            .last()
            .map(|h| h.addrs.iter().filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default();
        swarm.add_peer_addresses(last, addrs).await;
        let _ = swarm.probe_rtt(last).await;
    }
    let session: u64 = rand::random();
    let mut control = swarm.stream_control();
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        control.open_stream(first_peer, StreamProtocol::new(ACT_PROTOCOL)),
    )
    .await
    .map_err(|_| (hop_err(0, "no stream within 10 s".into()), false))?
    .map_err(|e| (hop_err(0, e.to_string()), false))?;
    let (mut r, mut w) = s.split();
    let open = OpenSession {
        session,
        model_id: model_id.to_string(),
        hops: hops.to_vec(),
        index: 0,
        sampling: opts.sampling,
        wire: opts.wire,
        asker: swarm.peer_id().to_string(),
    };
    write_frame(&mut w, &ActFrame::Open(open), &[])
        .await
        .map_err(|e| (hop_err(0, e.to_string()), false))?;
    let ready =
        tokio::time::timeout(Duration::from_secs(40), read_frame::<_, ActReply>(&mut r)).await;
    match ready {
        Ok(Ok((ActReply::Ready, _))) => {}
        Ok(Ok((ActReply::Failed { index, message, .. }, _))) => {
            return Err((hop_err(index, message), false))
        }
        Ok(Err(e)) => return Err((hop_err(0, format!("chain setup: {e}")), false)),
        Err(_) => return Err((hop_err(0, "chain not ready within 40 s".into()), false)),
    }
    // The last hop's token stream.
    let mut tokens = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some((_peer, mut s)) = incoming.next().await {
            if let Ok((TokenFrame::Hello { session: id }, _)) =
                read_frame::<_, TokenFrame>(&mut s).await
            {
                if id == session {
                    return Some(s);
                }
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| {
        (
            hop_err(
                hops.len() as u32 - 1,
                "the last hop never opened its token stream".into(),
            ),
            false,
        )
    })?;
    // Failures reported upstream by any hop, watched while we wait for tokens.
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel::<(u32, String)>(4);
    tokio::spawn(async move {
        loop {
            match read_frame::<_, ActReply>(&mut r).await {
                Ok((ActReply::Failed { index, message, .. }, _)) => {
                    let _ = fail_tx.send((index, message)).await;
                }
                Ok((ActReply::Ready, _)) => {}
                Err(e) => {
                    let _ = fail_tx.send((0, format!("stream closed: {e}"))).await;
                    return;
                }
            }
        }
    });
    let setup_s = t_setup.elapsed().as_secs_f64();
    on_chain(report);

    let n_hops = hops.len().max(1) as f64;
    let mut out_tokens = Vec::new();
    let mut text = String::new();
    let mut utf8 = Utf8Stream::default();
    let mut overheads_ms = Vec::new();
    let mut timings = AskTimings {
        prompt_tokens: prompt.len(),
        setup_s,
        ..AskTimings::default()
    };
    let mut input: Vec<i32> = prompt.to_vec();
    let mut pos: u32 = 0;
    let mut t_decode_start = None;
    for step in 0..opts.max_tokens as u64 {
        let header = StepHeader {
            step,
            pos,
            n_tokens: input.len() as u32,
            kind: StepKind::Tokens,
            compute_us: 0,
        };
        let t0 = Instant::now();
        let sent = !out_tokens.is_empty();
        write_frame(&mut w, &ActFrame::Step(header), &tokens_to_bytes(&input))
            .await
            .map_err(|e| (hop_err(0, e.to_string()), sent))?;
        let frame = tokio::select! {
            f = tokio::time::timeout(opts.step_timeout, read_frame::<_, TokenFrame>(&mut tokens)) => f,
            Some((index, message)) = fail_rx.recv() => return Err((hop_err(index, message), sent)),
        };
        let (token, compute_us) = match frame {
            Ok(Ok((
                TokenFrame::Token {
                    step: s,
                    token,
                    compute_us,
                },
                _,
            ))) if s == step => (token, compute_us),
            Ok(Ok((TokenFrame::Failed { message }, _))) => {
                return Err((hop_err(hops.len() as u32 - 1, message), sent))
            }
            Ok(Ok(_)) => {
                return Err((
                    hop_err(hops.len() as u32 - 1, "unexpected token frame".into()),
                    sent,
                ))
            }
            Ok(Err(e)) => {
                let detail = fail_rx.try_recv().ok();
                return Err(match detail {
                    Some((index, message)) => (hop_err(index, message), sent),
                    None => (
                        hop_err(hops.len() as u32 - 1, format!("token stream: {e}")),
                        sent,
                    ),
                });
            }
            Err(_) => {
                return Err((
                    AskError::Timeout(format!(
                        "step {step} got no token within {:?}",
                        opts.step_timeout
                    )),
                    sent,
                ))
            }
        };
        let elapsed = t0.elapsed();
        if step == 0 {
            timings.prefill_s = elapsed.as_secs_f64();
            t_decode_start = Some(Instant::now());
        } else {
            let overhead = elapsed.as_secs_f64() * 1e3 - compute_us as f64 / 1e3;
            overheads_ms.push(overhead / n_hops);
        }
        pos += input.len() as u32;
        if tok.is_eog(token) {
            break;
        }
        out_tokens.push(token);
        let piece = utf8.push(&tok.piece(token));
        on_text(&piece);
        text.push_str(&piece);
        if pos >= limit {
            break;
        }
        input = vec![token];
    }
    let rest = utf8.finish();
    on_text(&rest);
    text.push_str(&rest);
    let _ = write_frame(&mut w, &ActFrame::Close, &[]).await;
    let _ = w.close().await;
    timings.prefill_tps = prompt.len() as f64 / timings.prefill_s.max(1e-9);
    timings.decode_steps = overheads_ms.len();
    timings.decode_s = t_decode_start
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    timings.decode_tps = timings.decode_steps as f64 / timings.decode_s.max(1e-9);
    overheads_ms.sort_by(|a, b| a.total_cmp(b));
    if !overheads_ms.is_empty() {
        timings.hop_overhead_median_ms = overheads_ms[overheads_ms.len() / 2];
        let i =
            ((overheads_ms.len() as f64 * 0.99).ceil() as usize).clamp(1, overheads_ms.len()) - 1;
        timings.hop_overhead_p99_ms = overheads_ms[i];
    }
    Ok(AskOutcome {
        text,
        tokens: out_tokens,
        chain: report.to_vec(),
        model_id: model_id.to_string(),
        timings,
    })
}

/// Shared pieces for building a node's vocabulary offer.
pub fn vocab_offer(
    model: &Path,
    info: &nakshatra_slicer::ModelInfo,
) -> Option<crate::hop::VocabOffer> {
    let gguf = nakshatra_slicer::vocab_gguf(model).ok()?;
    let hashes =
        nakshatra_swarm::protocol::encode(&nakshatra_slicer::ModelHashes::from(info)).ok()?;
    Some((Arc::new(gguf), Arc::new(hashes)))
}
