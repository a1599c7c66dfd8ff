//! OpenAI's protocol: `GET /v1/models`, `GET /v1/models/{model}`,
//! `POST /v1/chat/completions` and
//! `POST /v1/completions`, whole or streamed as server-sent events.

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::params::{self, GenRequest};
use super::run::{self, chain_json, finish_reason, stats_json, unix_now, Event, Running};
use super::AppState;
use crate::ask::AskOutcome;

/// How often an idle stream sends a comment (a slow prefill, a chain
/// being repaired): keeps proxies from closing it, and a client that left
/// is noticed within this time.
pub const SSE_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);

/// Which endpoint: chat messages or a text prompt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Chat,
    Text,
}

/// `GET /v1/models`: every model the swarm announces, with its coverage.
pub async fn models(State(st): State<AppState>) -> Response {
    let Some(snap) = st.snapshot().await else {
        return ApiError::unavailable("no view of the swarm yet").openai();
    };
    let data: Vec<Value> = snap.view.models.iter().map(model_object).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{model}`: one model, named as any request names it
/// (id, name, a name's base, id prefix).
pub async fn model(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    let id = match st.resolve_model(Some(&name)).await {
        Ok(id) => id,
        Err(e) => return e.openai(),
    };
    let Some(snap) = st.snapshot().await else {
        return ApiError::unavailable("no view of the swarm yet").openai();
    };
    match snap.view.models.iter().find(|m| m.id == id) {
        Some(m) => Json(model_object(m)).into_response(),
        // Announced since the last view: ask again in a moment.
        None => ApiError::unknown_model(&id).openai(),
    }
}

/// A model as OpenAI's model object, with the swarm's extras: its name,
/// architecture, layers, coverage and the context a chain can give.
fn model_object(m: &nakshatra_swarm::ModelView) -> Value {
    let covered = m.coverage.iter().filter(|h| !h.is_empty()).count();
    json!({
        "id": m.id,
        "name": m.name,
        "object": "model",
        "created": 0,
        "owned_by": "nakshatra",
        "arch": m.arch,
        "n_layers": m.n_layers,
        "context_length": super::served_context(m),
        "coverage": {"covered": covered, "total": m.n_layers, "gaps": m.gaps},
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(st): State<AppState>, body: Bytes) -> Response {
    complete(st, params::openai_chat(&body), Flavor::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(State(st): State<AppState>, body: Bytes) -> Response {
    complete(st, params::openai_completion(&body), Flavor::Text).await
}

async fn complete(st: AppState, req: Result<GenRequest, ApiError>, flavor: Flavor) -> Response {
    let req = match req {
        Ok(r) => r,
        Err(e) => return e.openai(),
    };
    let run = match run::start(&st, &req).await {
        Ok(r) => r,
        Err(e) => return e.openai(),
    };
    let head = Head {
        id: format!(
            "{}-{:016x}",
            if flavor == Flavor::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: unix_now(),
        model: run.model_id.clone(),
        flavor,
    };
    if req.stream {
        stream(run, head, req.include_usage)
    } else {
        whole(run, head).await
    }
}

/// What every object of one answer repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
    flavor: Flavor,
}

impl Head {
    /// A streamed chunk: `delta` (chat) or `text` (completions).
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = match self.flavor {
            Flavor::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Flavor::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.flavor, chunk) {
            (Flavor::Chat, true) => "chat.completion.chunk",
            (Flavor::Chat, false) => "chat.completion",
            (Flavor::Text, _) => "text_completion",
        }
    }
}

/// OpenAI's usage object.
fn usage(o: &AskOutcome) -> Value {
    let (p, c) = (o.timings.prompt_tokens, o.tokens.len());
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

/// The whole answer in one object.
async fn whole(mut run: Running, head: Head) -> Response {
    let mut text = String::new();
    let mut chain = run.chain.clone();
    let outcome = loop {
        match run.rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Chain(c)) => chain = c,
            Some(Event::Done(r)) => break *r,
            None => return ApiError::unavailable("the ask stopped").openai(),
        }
    };
    let o = match outcome {
        Ok(o) => o,
        Err(e) => return ApiError::from(e).openai(),
    };
    let finish = finish_reason(o.finish);
    let choice = match head.flavor {
        Flavor::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                               "logprobs": null, "finish_reason": finish}),
        Flavor::Text => {
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
        }
    };
    Json(json!({
        "id": head.id,
        "object": head.object(false),
        "created": head.created,
        "model": head.model,
        "choices": [choice],
        "usage": usage(&o),
        "nakshatra": stats_json(&chain, &o),
    }))
    .into_response()
}

/// Where a stream stands.
enum Phase {
    /// The first chunk (the role, and the chain) is still to go.
    Start,
    /// Text as it comes.
    Body,
    /// `[DONE]` was sent.
    Over,
}

/// The answer as server-sent events, ending in `data: [DONE]`. Dropping
/// the stream (the client left) drops the ask.
fn stream(run: Running, head: Head, include_usage: bool) -> Response {
    let state = (run, head, Phase::Start);
    let events = futures::stream::unfold(state, move |(mut run, head, phase)| async move {
        let out: Vec<Value> = match phase {
            Phase::Over => return None,
            Phase::Start => {
                let mut c = head.chunk(Some(""), true, None);
                c["nakshatra"] = json!({"chain": chain_json(&run.chain)});
                return Some((vec![data(&c)], (run, head, Phase::Body)));
            }
            Phase::Body => match run.rx.recv().await {
                Some(Event::Text(t)) => vec![head.chunk(Some(&t), false, None)],
                Some(Event::Chain(c)) => {
                    run.chain = c;
                    Vec::new()
                }
                Some(Event::Done(r)) => match *r {
                    Ok(o) => {
                        let mut last = head.chunk(None, false, Some(finish_reason(o.finish)));
                        last["nakshatra"] = stats_json(&run.chain, &o);
                        let mut v = vec![last];
                        if include_usage {
                            let mut u = head.chunk(None, false, None);
                            u["choices"] = json!([]);
                            u["usage"] = usage(&o);
                            v.push(u);
                        }
                        let mut events: Vec<Sse> = v.iter().map(data).collect();
                        events.push(Sse::default().data("[DONE]"));
                        return Some((events, (run, head, Phase::Over)));
                    }
                    Err(e) => {
                        let body = ApiError::from(e).openai_body();
                        let events = vec![data(&body), Sse::default().data("[DONE]")];
                        return Some((events, (run, head, Phase::Over)));
                    }
                },
                None => return None,
            },
        };
        Some((out.iter().map(data).collect(), (run, head, Phase::Body)))
    })
    .flat_map(|v| futures::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    axum::response::Sse::new(events)
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response()
}

/// One `data:` event holding `v` as JSON.
fn data(v: &Value) -> Sse {
    Sse::default().data(v.to_string())
}
