//! Ollama's protocol: `GET /api/tags`, `GET /api/ps`, `POST /api/show`,
//! `GET /api/version`, and `POST /api/chat` / `POST /api/generate`,
//! streamed as NDJSON (one JSON object a line) unless `"stream": false`.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use nakshatra_swarm::{ModelView, SwarmView};
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::{self, GenRequest};
use super::run::{self, finish_reason, stats_json, Event, Running};
use super::AppState;
use crate::ask::AskOutcome;

/// The Ollama API version this server speaks.
pub const OLLAMA_VERSION: &str = "0.6.0";

/// `GET /api/version`.
pub async fn version() -> Response {
    Json(json!({"version": OLLAMA_VERSION, "nakshatra": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `GET /api/tags`: the swarm's models.
pub async fn tags(State(st): State<AppState>) -> Response {
    let Some(snap) = st.snapshot().await else {
        return ApiError::unavailable("no view of the swarm yet").ollama();
    };
    let models: Vec<Value> = snap
        .view
        .models
        .iter()
        .map(|m| listed(&snap.view, m))
        .collect();
    Json(json!({ "models": models })).into_response()
}

/// `GET /api/ps`: the models this API can answer with now (every block
/// covered), as Ollama lists its loaded models. The weights are the
/// swarm's, so sizes are 0 and nothing expires.
pub async fn ps(State(st): State<AppState>) -> Response {
    let Some(snap) = st.snapshot().await else {
        return ApiError::unavailable("no view of the swarm yet").ollama();
    };
    let models: Vec<Value> = snap
        .view
        .models
        .iter()
        .filter(|m| m.is_fully_covered())
        .map(|m| {
            let mut v = listed(&snap.view, m);
            v["expires_at"] = json!(NEVER);
            v["size_vram"] = json!(0);
            v["context_length"] = json!(super::served_context(m));
            v
        })
        .collect();
    Json(json!({ "models": models })).into_response()
}

/// `POST /api/show`: one model, named as any request names it: its
/// details, and in `model_info` its architecture, layers, name, id and
/// the context a chain can give (see [`super::served_context`]).
pub async fn show(State(st): State<AppState>, body: Bytes) -> Response {
    let name = match params::ollama_show(&body) {
        Ok(n) => n,
        Err(e) => return e.ollama(),
    };
    let id = match st.resolve_model(name.as_deref()).await {
        Ok(id) => id,
        Err(e) => return e.ollama(),
    };
    let Some(snap) = st.snapshot().await else {
        return ApiError::unavailable("no view of the swarm yet").ollama();
    };
    let Some(m) = snap.view.models.iter().find(|m| m.id == id) else {
        // Announced since the last view: ask again in a moment.
        return ApiError::unknown_model(&id).ollama();
    };
    let arch = &m.arch;
    let covered = m.coverage.iter().filter(|h| !h.is_empty()).count();
    Json(json!({
        "license": "",
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(m),
        "model_info": {
            "general.architecture": arch,
            "general.name": m.name,
            format!("{arch}.block_count"): m.n_layers,
            format!("{arch}.context_length"): super::served_context(m),
            "nakshatra.model_id": m.id,
            "nakshatra.blocks_covered": covered,
        },
        "capabilities": ["completion"],
        "modified_at": EPOCH,
    }))
    .into_response()
}

/// What Ollama says for "never" (its zero time).
const NEVER: &str = "0001-01-01T00:00:00Z";
/// `modified_at` of every model: the swarm's models have no file date.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// A model as `/api/tags` and `/api/ps` list it: `name` and `model` are
/// its name where that names this model and no other (so that a client
/// sending it back gets this one), else its id; `digest` is the id.
fn listed(view: &SwarmView, m: &ModelView) -> Value {
    let name = if !m.name.is_empty() && view.resolve(Some(&m.name)).as_ref() == Ok(&m.id) {
        &m.name
    } else {
        &m.id
    };
    json!({
        "name": name,
        "model": name,
        "modified_at": EPOCH,
        "size": 0,
        "digest": m.id,
        "details": details(m),
    })
}

/// Ollama's `details` of a model.
fn details(m: &ModelView) -> Value {
    json!({"parent_model": "", "format": "gguf", "family": m.arch, "families": [m.arch],
           "parameter_size": "", "quantization_level": ""})
}

/// Which endpoint: `message` objects or `response` text.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Generate,
}

/// `POST /api/chat`.
pub async fn chat(State(st): State<AppState>, body: Bytes) -> Response {
    answer(st, params::ollama_chat(&body), Flavor::Chat).await
}

/// `POST /api/generate`.
pub async fn generate(State(st): State<AppState>, body: Bytes) -> Response {
    answer(st, params::ollama_generate(&body), Flavor::Generate).await
}

async fn answer(st: AppState, req: Result<GenRequest, ApiError>, flavor: Flavor) -> Response {
    let t0 = Instant::now();
    let req = match req {
        Ok(r) => r,
        Err(e) => return e.ollama(),
    };
    let run = match run::start(&st, &req).await {
        Ok(r) => r,
        Err(e) => return e.ollama(),
    };
    if req.stream {
        stream(run, flavor, t0)
    } else {
        whole(run, flavor, t0).await
    }
}

/// RFC 3339 time now.
fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One object carrying `text`.
fn piece(model: &str, flavor: Flavor, text: &str, done: bool) -> Value {
    let mut v = json!({"model": model, "created_at": now(), "done": done});
    match flavor {
        Flavor::Chat => v["message"] = json!({"role": "assistant", "content": text}),
        Flavor::Generate => v["response"] = json!(text),
    }
    v
}

/// The last object: why it ended, counts and durations (nanoseconds).
fn last(
    model: &str,
    flavor: Flavor,
    text: &str,
    o: &AskOutcome,
    t0: Instant,
    chain: &[crate::ask::HopReport],
) -> Value {
    let mut v = piece(model, flavor, text, true);
    let t = &o.timings;
    let ns = |s: f64| (s * 1e9) as u64;
    v["done_reason"] = json!(finish_reason(o.finish));
    v["total_duration"] = json!(t0.elapsed().as_nanos() as u64);
    v["load_duration"] = json!(ns(t.setup_s));
    v["prompt_eval_count"] = json!(t.prompt_tokens);
    v["prompt_eval_duration"] = json!(ns(t.prefill_s));
    v["eval_count"] = json!(o.tokens.len());
    v["eval_duration"] = json!(ns(t.decode_s));
    v["nakshatra"] = stats_json(chain, o);
    v
}

async fn whole(mut run: Running, flavor: Flavor, t0: Instant) -> Response {
    let mut text = String::new();
    let outcome = loop {
        match run.rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Chain(c)) => run.chain = c,
            Some(Event::Done(r)) => break *r,
            None => return ApiError::unavailable("the ask stopped").ollama(),
        }
    };
    match outcome {
        Ok(o) => Json(last(&run.model_id, flavor, &text, &o, t0, &run.chain)).into_response(),
        Err(e) => ApiError::from(e).ollama(),
    }
}

/// NDJSON, one object per piece of text, then the last one. Dropping
/// the body (the client left) drops the ask.
fn stream(run: Running, flavor: Flavor, t0: Instant) -> Response {
    let lines = futures::stream::unfold(Some(run), move |run| async move {
        let mut run = run?;
        loop {
            let v = match run.rx.recv().await? {
                Event::Text(t) => piece(&run.model_id, flavor, &t, false),
                Event::Chain(c) => {
                    run.chain = c;
                    continue;
                }
                Event::Done(r) => {
                    let v = match *r {
                        Ok(o) => last(&run.model_id, flavor, "", &o, t0, &run.chain),
                        Err(e) => json!({"error": ApiError::from(e).message}),
                    };
                    return Some((line(&v), None));
                }
            };
            return Some((line(&v), Some(run)));
        }
    })
    .map(Ok::<_, Infallible>);
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}
