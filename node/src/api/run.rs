//! One request's ask, run as a task of its own that reports through a
//! channel: the chain, the text as it comes (stop strings applied), then
//! the outcome. When the request goes away (the client disconnected, its
//! response body was dropped) the channel closes and the task drops the
//! ask, which closes the chain at every hop at once.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nakshatra_swarm::protocol::act::WireDtype;
use tokio::sync::mpsc;

use super::error::ApiError;
use super::metrics::{ApiMetrics, InFlight};
use super::params::GenRequest;
use super::stop::{Matched, StopMatcher};
use super::AppState;
use crate::ask::{AskError, AskEvents, AskOptions, AskOutcome, Finish, HopReport, Recovery};

/// How long one step may take (as `node ask --step-timeout`).
pub const API_STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a chain that lost a hop waits for a replacement.
pub const API_RECOVER_WAIT: Duration = Duration::from_secs(30);
/// How long a request waits on hops with no free session before it is
/// answered 503 (shorter than `node ask`'s: an HTTP client is waiting).
pub const API_BUSY_WAIT: Duration = Duration::from_secs(30);
/// Chains tried before a request fails.
pub const API_ATTEMPTS: u32 = 4;

/// What the ask task reports.
#[derive(Debug)]
pub enum Event {
    /// The chain (again after a repair).
    Chain(Vec<HopReport>),
    /// Text, stop strings already applied (never empty).
    Text(String),
    /// The end.
    Done(Box<Result<AskOutcome, AskError>>),
}

/// An ask whose chain is open.
pub struct Running {
    /// The model's full id.
    pub model_id: String,
    /// The chain that opened.
    pub chain: Vec<HopReport>,
    /// What comes next.
    pub rx: mpsc::UnboundedReceiver<Event>,
}

/// Starts the ask of `req` and waits for its chain: a failure before the
/// first token comes back as an error with its own status code.
pub async fn start(st: &AppState, req: &GenRequest) -> Result<Running, ApiError> {
    let model_id = st.resolve_model(req.model.as_deref()).await?;
    let opts = AskOptions {
        model: Some(model_id.clone()),
        prompt: req.prompt.clone(),
        max_tokens: req.max_tokens,
        sampling: req.sampling,
        wire: WireDtype::F32,
        direct: true,
        step_timeout: API_STEP_TIMEOUT,
        attempts: API_ATTEMPTS,
        verify: 0.0,
        recover_wait: API_RECOVER_WAIT,
        busy_wait: API_BUSY_WAIT,
        fresh_recovery: false,
        trace: None,
        draft: st.0.draft.clone(),
        ring: true,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let svc = st.0.svc.clone();
    let metrics = st.0.metrics.clone();
    let stops = req.stops.clone();
    tokio::spawn(async move {
        let _running = InFlight::new(&metrics);
        let work = run(&svc, &opts, stops, &tx, &metrics);
        tokio::select! {
            r = work => {
                let outcome = if r.is_ok() { "ok" } else { "error" };
                ApiMetrics::count(&metrics.asks, &[("outcome", outcome)], 1);
                if let Ok(o) = &r {
                    let n = o.timings.prompt_tokens as u64;
                    ApiMetrics::count(&metrics.tokens, &[("kind", "prompt")], n);
                    let n = o.tokens.len() as u64;
                    ApiMetrics::count(&metrics.tokens, &[("kind", "completion")], n);
                    if let Some(s) = &o.timings.speculative {
                        let d = &metrics.drafts;
                        ApiMetrics::count(d, &[("outcome", "accepted")], s.accepted as u64);
                        let rejected = s.drafted.saturating_sub(s.accepted) as u64;
                        ApiMetrics::count(d, &[("outcome", "rejected")], rejected);
                    }
                }
                let _ = tx.send(Event::Done(Box::new(r)));
            }
            _ = tx.closed() => {
                ApiMetrics::count(&metrics.asks, &[("outcome", "cancelled")], 1);
                tracing::debug!("the client left; its ask is dropped and its chain closed");
            }
        }
    });
    loop {
        match rx.recv().await {
            Some(Event::Chain(chain)) => {
                return Ok(Running {
                    model_id,
                    chain,
                    rx,
                })
            }
            Some(Event::Text(_)) => {}
            Some(Event::Done(r)) => {
                return Err(match *r {
                    Err(e) => e.into(),
                    Ok(_) => ApiError::unavailable("the ask ended before its chain opened"),
                })
            }
            None => return Err(ApiError::unavailable("the ask stopped")),
        }
    }
}

/// The ask itself: events out through `tx`, stop strings applied.
async fn run(
    svc: &crate::ask::AskerService,
    opts: &AskOptions,
    stops: Vec<String>,
    tx: &mpsc::UnboundedSender<Event>,
    metrics: &Arc<ApiMetrics>,
) -> Result<AskOutcome, AskError> {
    let t0 = Instant::now();
    let mut matcher = StopMatcher::new(stops);
    let mut first = true;
    let r = {
        let mut on_chain = |c: &[HopReport]| {
            let _ = tx.send(Event::Chain(c.to_vec()));
        };
        let mut on_text = |s: &str| {
            metrics.streamed.inc();
            if first {
                first = false;
                metrics.ttft.observe(t0.elapsed().as_secs_f64());
            }
            let (text, flow) = match matcher.push(s) {
                Matched::Text(t) => (t, ControlFlow::Continue(())),
                Matched::Stop(t) => (t, ControlFlow::Break(())),
            };
            if !text.is_empty() {
                let _ = tx.send(Event::Text(text));
            }
            flow
        };
        let mut on_recovery = |r: &Recovery| {
            tracing::info!("{}", crate::ask::recovery_line(r));
        };
        svc.ask(
            opts,
            AskEvents {
                chain: &mut on_chain,
                text: &mut on_text,
                recovery: &mut on_recovery,
            },
        )
        .await
    };
    if let Ok(o) = &r {
        if o.finish != Finish::StopString {
            let rest = matcher.finish();
            if !rest.is_empty() {
                let _ = tx.send(Event::Text(rest));
            }
        }
    }
    r
}

/// OpenAI's `finish_reason` (Ollama's `done_reason`).
pub fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop | Finish::StopString => "stop",
        Finish::Length | Finish::Context => "length",
    }
}

/// The `nakshatra` extension's chain: peers, ranges, relayed or not.
pub fn chain_json(chain: &[HopReport]) -> serde_json::Value {
    chain
        .iter()
        .map(|h| serde_json::json!({"peer_id": h.peer_id, "range": h.range, "relayed": h.relayed}))
        .collect()
}

/// The `nakshatra` extension of a finished answer.
pub fn stats_json(chain: &[HopReport], o: &AskOutcome) -> serde_json::Value {
    let t = &o.timings;
    serde_json::json!({
        "chain": chain_json(chain),
        "ttft_s": t.setup_s + t.prefill_s,
        "decode_tps": t.decode_tps,
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": o.tokens.len(),
        "recoveries": o.recoveries.len(),
    })
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
