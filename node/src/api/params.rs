//! Request bodies of both protocols, parsed into one [`GenRequest`] with
//! every value checked (a bad one is a 400 naming the parameter) and the
//! defaults of each protocol in one place.
//!
//! Bodies are parsed by hand from JSON values rather than derived, so that
//! a wrong value names its parameter and unknown fields are ignored, as
//! OpenAI's and Ollama's own servers do.

use nakshatra_swarm::protocol::act::Sampling;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::stop::{MAX_STOPS, MAX_STOP_BYTES};
use crate::ask::Prompt;
use crate::engine::tokenizer::ChatMessage;

/// Tokens generated when a request does not say (the chain's context
/// bounds it too).
pub const DEFAULT_MAX_TOKENS: u32 = 512;
/// Most messages one chat request may carry.
pub const MAX_MESSAGES: usize = 1024;

/// OpenAI's defaults: temperature 1, top-p 1, no top-k.
const OPENAI_DEFAULTS: (f32, f32, i32) = (1.0, 1.0, 0);
/// Ollama's defaults: temperature 0.8, top-p 0.9, top-k 40.
const OLLAMA_DEFAULTS: (f32, f32, i32) = (0.8, 0.9, 40);

/// One generation, as either protocol asked for it.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// The model as named (id or prefix); `None`: the only one.
    pub model: Option<String>,
    /// What to continue.
    pub prompt: Prompt,
    /// Tokens to generate at most.
    pub max_tokens: u32,
    /// Sampling at the last hop.
    pub sampling: Sampling,
    /// Stop strings (at most [`MAX_STOPS`]).
    pub stops: Vec<String>,
    /// Stream the answer.
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`: a last chunk with usage.
    pub include_usage: bool,
}

/// Parses a body as a JSON object (400 `invalid_json` otherwise).
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "invalid_json",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// A field that may be absent or null.
fn field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn number(m: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad_param(k, format!("`{k}` must be a number"))),
    }
}

fn integer(m: &Map<String, Value>, k: &str) -> Result<Option<i64>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_param(k, format!("`{k}` must be an integer"))),
    }
}

fn boolean(m: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| ApiError::bad_param(k, format!("`{k}` must be true or false"))),
    }
}

fn string<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match field(m, k) {
        None => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| ApiError::bad_param(k, format!("`{k}` must be a string"))),
    }
}

/// The model named, `None` when absent or empty.
fn model(m: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    Ok(string(m, "model")?
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from))
}

/// `stop`: a string or an array of up to [`MAX_STOPS`] strings.
fn stops(m: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let v: Vec<String> = match field(m, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(String::from).ok_or_else(|| {
                    ApiError::bad_param("stop", "`stop` must be a string or an array of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::bad_param(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if v.len() > MAX_STOPS {
        return Err(ApiError::bad_param(
            "stop",
            format!("at most {MAX_STOPS} stop strings"),
        ));
    }
    if v.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::bad_param(
            "stop",
            format!("a stop string is over {MAX_STOP_BYTES} bytes"),
        ));
    }
    Ok(v)
}

/// Sampling values checked against what the last hop accepts.
fn sampling(
    m: &Map<String, Value>,
    defaults: (f32, f32, i32),
    random_seed: bool,
) -> Result<Sampling, ApiError> {
    let temperature = number(m, "temperature")?.unwrap_or(f64::from(defaults.0));
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_param(
            "temperature",
            "`temperature` must be between 0 and 2",
        ));
    }
    let top_p = number(m, "top_p")?.unwrap_or(f64::from(defaults.1));
    if !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::bad_param(
            "top_p",
            "`top_p` must be between 0 and 1",
        ));
    }
    let top_k = integer(m, "top_k")?.unwrap_or(i64::from(defaults.2));
    let top_k = i32::try_from(top_k)
        .ok()
        .filter(|k| *k >= 0)
        .ok_or_else(|| ApiError::bad_param("top_k", "`top_k` must be 0 (off) or more"))?;
    let seed = match integer(m, "seed")? {
        Some(s) => u32::try_from(s)
            .map_err(|_| ApiError::bad_param("seed", "`seed` must be between 0 and 4294967295"))?,
        None if random_seed => rand::random(),
        None => 0,
    };
    Ok(Sampling {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed,
    })
}

/// A token budget: at least 1.
fn max_tokens(m: &Map<String, Value>, keys: &[&str]) -> Result<u32, ApiError> {
    for k in keys {
        if let Some(n) = integer(m, k)? {
            return u32::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::bad_param(k, format!("`{k}` must be at least 1")));
        }
    }
    Ok(DEFAULT_MAX_TOKENS)
}

/// A message's text: a string, or an array of `{"type":"text","text":..}`
/// parts (joined).
fn content(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => out.push_str(t),
                    _ => {
                        return Err(ApiError::bad_param(
                            "messages",
                            "only text content parts are supported",
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::bad_param(
            "messages",
            "a message's `content` must be a string or an array of text parts",
        )),
    }
}

/// `messages`: a non-empty array of `{role, content}`.
fn messages(m: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let Some(Value::Array(a)) = field(m, "messages") else {
        return Err(ApiError::bad_param(
            "messages",
            "`messages` must be a non-empty array",
        ));
    };
    if a.is_empty() || a.len() > MAX_MESSAGES {
        return Err(ApiError::bad_param(
            "messages",
            format!("`messages` must hold 1 to {MAX_MESSAGES} messages"),
        ));
    }
    a.iter()
        .map(|msg| {
            let role = msg.get("role").and_then(Value::as_str).unwrap_or_default();
            let role = match role {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad_param(
                        "messages",
                        format!("unsupported message role {other:?} (system, user, assistant)"),
                    ))
                }
            };
            Ok(ChatMessage::new(role, &content(msg.get("content"))?))
        })
        .collect()
}

/// `n`: only 1.
fn one_choice(m: &Map<String, Value>) -> Result<(), ApiError> {
    match integer(m, "n")? {
        None | Some(1) => Ok(()),
        Some(_) => Err(ApiError::bad_param("n", "only `n` = 1 is supported")),
    }
}

/// `stream_options.include_usage`.
fn include_usage(m: &Map<String, Value>) -> bool {
    field(m, "stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// `POST /v1/chat/completions`.
pub fn openai_chat(body: &[u8]) -> Result<GenRequest, ApiError> {
    let m = object(body)?;
    one_choice(&m)?;
    Ok(GenRequest {
        model: model(&m)?,
        prompt: Prompt::Chat(messages(&m)?),
        max_tokens: max_tokens(&m, &["max_completion_tokens", "max_tokens"])?,
        sampling: sampling(&m, OPENAI_DEFAULTS, true)?,
        stops: stops(&m)?,
        stream: boolean(&m, "stream")?.unwrap_or(false),
        include_usage: include_usage(&m),
    })
}

/// `POST /v1/completions`: the prompt as is.
pub fn openai_completion(body: &[u8]) -> Result<GenRequest, ApiError> {
    let m = object(body)?;
    one_choice(&m)?;
    let prompt = match field(&m, "prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::bad_param(
                "prompt",
                "`prompt` must be a string (one prompt per request)",
            ))
        }
    };
    Ok(GenRequest {
        model: model(&m)?,
        prompt: Prompt::Raw(prompt),
        max_tokens: max_tokens(&m, &["max_tokens"])?,
        sampling: sampling(&m, OPENAI_DEFAULTS, true)?,
        stops: stops(&m)?,
        stream: boolean(&m, "stream")?.unwrap_or(false),
        include_usage: include_usage(&m),
    })
}

/// Ollama's `options`, checked; `num_predict` -1 (or -2): until the
/// context is full.
fn ollama_options(m: &Map<String, Value>) -> Result<(u32, Sampling, Vec<String>), ApiError> {
    let empty = Map::new();
    let o = match field(m, "options") {
        None => &empty,
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::bad_param(
                "options",
                "`options` must be an object",
            ))
        }
    };
    let max = match integer(o, "num_predict")? {
        None => DEFAULT_MAX_TOKENS,
        Some(-1 | -2) => u32::MAX,
        Some(n) => u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            ApiError::bad_param("num_predict", "`num_predict` must be -1 or at least 1")
        })?,
    };
    Ok((max, sampling(o, OLLAMA_DEFAULTS, true)?, stops(o)?))
}

/// `POST /api/chat`.
pub fn ollama_chat(body: &[u8]) -> Result<GenRequest, ApiError> {
    let m = object(body)?;
    let (max_tokens, sampling, stops) = ollama_options(&m)?;
    Ok(GenRequest {
        model: model(&m)?,
        prompt: Prompt::Chat(messages(&m)?),
        max_tokens,
        sampling,
        stops,
        stream: boolean(&m, "stream")?.unwrap_or(true),
        include_usage: false,
    })
}

/// `POST /api/show`: the model named by `model` (older clients: `name`).
pub fn ollama_show(body: &[u8]) -> Result<Option<String>, ApiError> {
    let m = object(body)?;
    Ok(match model(&m)? {
        Some(name) => Some(name),
        None => string(&m, "name")?
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from),
    })
}

/// `POST /api/generate`: the template applied to `system` and `prompt`,
/// unless `raw`.
pub fn ollama_generate(body: &[u8]) -> Result<GenRequest, ApiError> {
    let m = object(body)?;
    let (max_tokens, sampling, stops) = ollama_options(&m)?;
    let text = string(&m, "prompt")?.unwrap_or_default().to_string();
    let prompt = if boolean(&m, "raw")?.unwrap_or(false) {
        Prompt::Raw(text)
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = string(&m, "system")? {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &text));
        Prompt::Chat(msgs)
    };
    Ok(GenRequest {
        model: model(&m)?,
        prompt,
        max_tokens,
        sampling,
        stops,
        stream: boolean(&m, "stream")?.unwrap_or(true),
        include_usage: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: Result<GenRequest, ApiError>) -> ApiError {
        match r {
            Ok(g) => panic!("accepted: {g:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn bad_values_are_400s_that_name_the_parameter() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":-1}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"top_p":1.5}"#,
                "top_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"top_k":-2}"#,
                "top_k",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"seed":-5}"#,
                "seed",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"seed":4294967296}"#,
                "seed",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"n":2}"#,
                "n",
            ),
            (
                r#"{"messages":[{"role":"user","content":"hi"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
            (
                r#"{"messages":[{"role":"tool","content":"hi"}]}"#,
                "messages",
            ),
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"model":"m"}"#, "messages"),
        ];
        for (body, param) in cases {
            let e = err(openai_chat(body.as_bytes()));
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(*param), "{body}: {e:?}");
            let b = e.openai_body();
            assert_eq!(b["error"]["param"], *param);
            assert_eq!(b["error"]["type"], "invalid_request_error");
        }
        for body in ["{not json", "[1,2]", ""] {
            let e = err(openai_chat(body.as_bytes()));
            assert_eq!((e.status.as_u16(), e.code), (400, "invalid_json"), "{body}");
        }
    }

    #[test]
    fn defaults_differ_per_protocol_and_values_come_through() {
        let g = openai_chat(br#"{"model":"abc","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"temperature":0,"seed":7,"stop":"x","stream":true,"stream_options":{"include_usage":true}}"#)
            .expect("valid");
        assert_eq!(g.model.as_deref(), Some("abc"));
        assert_eq!(g.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(
            (
                g.sampling.temperature,
                g.sampling.top_p,
                g.sampling.top_k,
                g.sampling.seed
            ),
            (0.0, 1.0, 0, 7)
        );
        assert_eq!(g.stops, vec!["x".to_string()]);
        assert!(g.stream && g.include_usage);
        match &g.prompt {
            Prompt::Chat(m) => assert_eq!(
                m,
                &vec![
                    ChatMessage::new("system", "s"),
                    ChatMessage::new("user", "ab")
                ]
            ),
            p => panic!("{p:?}"),
        }
        let o = ollama_chat(br#"{"model":"","messages":[{"role":"user","content":"hi"}],"options":{"num_predict":-1}}"#)
            .expect("valid");
        assert_eq!(o.model, None);
        assert!(o.stream);
        assert_eq!(o.max_tokens, u32::MAX);
        assert_eq!(
            (o.sampling.temperature, o.sampling.top_p, o.sampling.top_k),
            (0.8, 0.9, 40)
        );
        let raw = ollama_generate(br#"{"prompt":"x","raw":true,"stream":false}"#).expect("valid");
        assert!(matches!(raw.prompt, Prompt::Raw(ref t) if t == "x") && !raw.stream);
        let c = openai_completion(br#"{"prompt":"once upon","max_tokens":5}"#).expect("valid");
        assert!(matches!(c.prompt, Prompt::Raw(ref t) if t == "once upon") && c.max_tokens == 5);
    }
}
