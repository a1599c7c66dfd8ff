//! The HTTP API (docs/api.md) against a real 3-node loopback swarm, with
//! real clients: the official `openai` and `ollama` Python packages
//! (pip-installed into `.cache/py` by the test), raw HTTP/1.1 for SSE and
//! NDJSON framing, and 16 concurrent streams of which 4 hang up
//! mid-answer — after which every session on every node is freed at once.

use std::time::{Duration, Instant};

use nakshatra_e2e::http::{self, ApiProc};
use nakshatra_e2e::*;
use serde_json::{json, Value};

const PROMPT: &str = "What is the capital of France?";
/// What `/v1/completions` continues (no template).
const RAW_PROMPT: &str = "The capital of France is";
/// The test model's name, as its servers announce it (from its GGUF's
/// `general.basename`, `size_label`, `finetune` and `file_type`).
const MODEL_NAME: &str = "smollm2:135m-8k-lc100k-mix1-ep2-q4_1";

/// `node join` flags for one test node holding `layers`.
fn join_args<'a>(
    model: &'a str,
    layers: &'a str,
    bootstrap: Option<&'a str>,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec!["node", "join"];
    v.extend(loopback_args(bootstrap));
    v.extend_from_slice(&["--model", model, "--layers", layers]);
    v.extend_from_slice(&["--max-sessions", "32", "--ctx-size", "512"]);
    v.extend_from_slice(&["--record-ttl", "8", "--refresh", "2"]);
    v.extend_from_slice(extra);
    v
}

/// A test node: a plain one or one with `--api`.
enum Node {
    Plain(Proc),
    Api(ApiProc),
}

impl Node {
    fn addr(&self) -> String {
        match self {
            Node::Plain(p) => p.addr().to_string(),
            Node::Api(p) => p.addr().to_string(),
        }
    }

    fn api(&self) -> &ApiProc {
        match self {
            Node::Api(p) => p,
            Node::Plain(_) => panic!("this node has no --api"),
        }
    }

    fn stderr(&self) -> String {
        match self {
            Node::Plain(p) => p.stderr(),
            Node::Api(p) => p.stderr(),
        }
    }
}

/// Three nodes holding 0..10, 10..20, 20..30 (bootstrapped to the first),
/// node `i` with `--api 127.0.0.1:0` when `api[i]`; waits for full
/// coverage.
fn three_nodes(model: &str, dirs: &[tempfile::TempDir], api: [bool; 3]) -> Vec<Node> {
    let start = |i: usize, layers: &str, boot: Option<&str>| {
        let extra: &[&str] = if api[i] {
            &["--api", "127.0.0.1:0"]
        } else {
            &[]
        };
        let args = join_args(model, layers, boot, extra);
        if api[i] {
            Node::Api(ApiProc::spawn(
                dirs[i].path(),
                &args,
                true,
                Duration::from_secs(60),
            ))
        } else {
            Node::Plain(Proc::join(dirs[i].path(), &args[2..]))
        }
    };
    let a = start(0, "0..10", None);
    let first = a.addr();
    let b = start(1, "10..20", Some(&first));
    let c = start(2, "20..30", Some(&first));
    let full = wait_for(Duration::from_secs(30), || {
        status_json(&first).filter(|v| covered_blocks(v).len() == 30)
    });
    assert!(
        full.is_some(),
        "swarm never covered the model; node C stderr:\n{}",
        c.stderr()
    );
    vec![a, b, c]
}

/// `nakshatra api --listen 127.0.0.1:0 --no-mdns --bootstrap BOOT EXTRA`.
fn api_client(dir: &std::path::Path, boot: &str, extra: &[&str]) -> ApiProc {
    let mut args = vec![
        "api",
        "--listen",
        "127.0.0.1:0",
        "--no-mdns",
        "--bootstrap",
        boot,
    ];
    args.extend_from_slice(extra);
    ApiProc::spawn(dir, &args, false, Duration::from_secs(60))
}

/// Waits until `GET base/v1/models` lists `model_id` fully covered.
fn wait_models(api: &ApiProc, model_id: &str, within: Duration) -> Value {
    let mut last = String::new();
    wait_for(within, || {
        let r = http::request("GET", &api.url("/v1/models"), &[], &[]).ok()?;
        last = format!("{} {}", r.status, r.text());
        let v = r.json();
        let m = v["data"]
            .as_array()?
            .iter()
            .find(|m| m["id"].as_str() == Some(model_id))?
            .clone();
        (m["coverage"]["covered"].as_u64() == Some(30)).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "{} never listed {model_id} fully covered; last answer: {last}\nstderr:\n{}",
            api.base,
            api.stderr()
        )
    })
}

/// Contract checks that do not stop the test: each failure is printed
/// when found, and all are reported together at the end ([`Checks::finish`]).
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn ok(&mut self, cond: bool, what: impl FnOnce() -> String) {
        if !cond {
            let w = what();
            eprintln!("CHECK FAILED: {w}");
            self.0.push(w);
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} check(s) failed:\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

/// `check!(checks, cond, "fmt", args..)`: a [`Checks`] entry.
macro_rules! check {
    ($c:expr, $cond:expr $(,)?) => {
        $c.ok($cond, || stringify!($cond).to_string())
    };
    ($c:expr, $cond:expr, $($fmt:tt)+) => {
        $c.ok($cond, || format!($($fmt)+))
    };
}

/// `check_eq!(checks, got, want, "fmt", args..)`: a [`Checks`] entry.
macro_rules! check_eq {
    ($c:expr, $got:expr, $want:expr $(,)?) => {
        check_eq!($c, $got, $want, "{}", stringify!($got))
    };
    ($c:expr, $got:expr, $want:expr, $($fmt:tt)+) => {{
        match (&$got, &$want) {
            (g, w) => $c.ok(g == w, || format!("{}: got {:?}, want {:?}", format!($($fmt)+), g, w)),
        }
    }};
}

/// The OpenAI error shape: `{"error":{"message":"..",..}}`.
fn assert_openai_error(c: &mut Checks, what: &str, got: &Value, status: u64) {
    check_eq!(
        c,
        got["status"].as_u64(),
        Some(status),
        "{what}: status ({got})"
    );
    let msg = got["body"]["error"]["message"].as_str();
    check!(
        c,
        msg.is_some_and(|m| !m.is_empty()),
        "{what}: not an OpenAI-shaped error body: {got}"
    );
    check!(
        c,
        got["body"]["error"]["type"].is_string(),
        "{what}: error without a type: {got}"
    );
}

/// The answer `node ask` prints (stdout less its final newline).
fn ask_text(o: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

#[test]
fn openai_and_ollama_clients_get_node_asks_text() {
    let t0 = Instant::now();
    // The venv first (pip on the first run), while nothing else runs.
    let venv = py::python_venv();
    eprintln!("python venv: {} ({:.1?})", venv.display(), t0.elapsed());
    let model = test_model();
    let model = model.to_str().expect("utf-8 model path");
    let model_id = inspect_model_id(model);
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = three_nodes(model, &dirs[..3], [false, false, true]);
    let boot = nodes[0].addr();
    let api = api_client(dirs[3].path(), &boot, &[]);
    eprintln!("swarm and api up at {} ({:.1?})", api.base, t0.elapsed());
    assert!(api.base.starts_with("http://127.0.0.1:"), "{}", api.base);

    let mut c = Checks::default();

    // /health: liveness, no key.
    let h = http::get(&api.url("/health"));
    check_eq!(c, h.status, 200, "/health: {}", h.text());
    check_eq!(c, h.json()["status"], "ok", "/health: {}", h.text());
    check!(c, h.json()["peers"].is_u64(), "/health: {}", h.text());

    // The list, through the raw route, once the view covers the model.
    let m = wait_models(&api, &model_id, Duration::from_secs(20));
    check_eq!(c, m["object"], "model", "{m}");
    check_eq!(c, m["n_layers"], 30, "{m}");
    check_eq!(c, m["coverage"]["total"], 30, "{m}");
    check_eq!(c, m["coverage"]["gaps"], json!([]), "{m}");

    // What `node ask` says (chat template, greedy, 24 tokens).
    let asker = tempfile::tempdir().unwrap();
    let o = node_ask(
        &boot,
        asker.path(),
        &["--temperature", "0", "--max-tokens", "24"],
        PROMPT,
    );
    assert!(
        o.status.success(),
        "node ask failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let want = ask_text(&o);
    assert!(!want.trim().is_empty(), "node ask said nothing");
    eprintln!("node ask: {want:?} ({:.1?})", t0.elapsed());

    // The official openai client.
    let v = py::run_json(
        "openai_check.py",
        &[&api.base, &model_id, PROMPT, "24", RAW_PROMPT],
    );
    eprintln!(
        "openai_check.py (openai {}): {:.1?}",
        v["openai_version"],
        t0.elapsed()
    );
    let models = v["models"]
        .as_array()
        .unwrap_or_else(|| panic!("models: {}", v["models"]));
    let listed = models
        .iter()
        .find(|m| m["id"] == model_id.as_str())
        .unwrap_or_else(|| {
            panic!(
                "{model_id} not in the openai client's list: {}",
                v["models"]
            )
        });
    check_eq!(c, listed["name"], MODEL_NAME, "{listed}");
    // Each of the three nodes gives a session 512 tokens (`--ctx-size`).
    check_eq!(c, listed["context_length"], 512, "{listed}");
    // One model, retrieved as any request names it (here the id).
    check_eq!(
        c,
        v["retrieved"]["id"],
        model_id.as_str(),
        "{}",
        v["retrieved"]
    );
    check_eq!(c, v["retrieved"]["name"], MODEL_NAME, "{}", v["retrieved"]);
    check_eq!(c, listed["coverage"]["covered"], 30, "{listed}");
    check_eq!(c, listed["coverage"]["total"], 30, "{listed}");
    check_eq!(
        c,
        v["chat"]["text"],
        want.as_str(),
        "non-streaming chat vs node ask: {}",
        v["chat"]
    );
    check_eq!(c, v["chat"]["role"], "assistant", "{}", v["chat"]);
    check_eq!(c, v["chat"]["object"], "chat.completion", "{}", v["chat"]);
    let usage = &v["chat"]["usage"];
    check_eq!(
        c,
        usage["completion_tokens"].as_u64().map(|n| n <= 24),
        Some(true),
        "{usage}"
    );
    check!(c, usage["prompt_tokens"].as_u64() > Some(0), "{usage}");
    check_eq!(
        c,
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap_or(0)
                + usage["completion_tokens"].as_u64().unwrap_or(0)
        ),
        "{usage}"
    );
    check!(
        c,
        matches!(v["chat"]["finish_reason"].as_str(), Some("stop" | "length")),
        "{}",
        v["chat"]
    );
    check_eq!(
        c,
        v["stream"]["text"],
        want.as_str(),
        "streaming chat vs node ask: {}",
        v["stream"]
    );
    check_eq!(c, v["stream"]["role"], "assistant", "{}", v["stream"]);
    check_eq!(
        c,
        v["stream"]["finish_reason"],
        v["chat"]["finish_reason"],
        "{}",
        v["stream"]
    );
    check_eq!(
        c,
        v["stream"]["usage"],
        v["chat"]["usage"],
        "stream usage (include_usage) vs non-stream"
    );
    check!(
        c,
        v["stream"]["pieces"].as_u64() > Some(1),
        "not streamed piece by piece: {}",
        v["stream"]
    );
    // A text completion: the prompt as is, no template.
    check_eq!(
        c,
        v["completion"]["object"],
        "text_completion",
        "{}",
        v["completion"]
    );
    check!(
        c,
        v["completion"]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "/v1/completions: {}",
        v["completion"]
    );
    let errors = &v["errors"];
    assert_openai_error(
        &mut c,
        "unknown model gpt-4o",
        &errors["unknown_model"],
        404,
    );
    assert_openai_error(
        &mut c,
        "unknown model (64 hex)",
        &errors["unknown_model_hex"],
        404,
    );
    assert_openai_error(&mut c, "max_tokens -1", &errors["negative_max_tokens"], 400);
    check_eq!(
        c,
        errors["negative_max_tokens"]["body"]["error"]["param"],
        "max_tokens",
        "{}",
        errors["negative_max_tokens"]
    );
    assert_openai_error(&mut c, "malformed JSON", &errors["malformed_json"], 400);
    for (k, e) in errors.as_object().into_iter().flatten() {
        eprintln!("  {k}: {} {}", e["status"], e["body"]);
    }

    // /v1/completions matches `node ask --raw` (the prompt as is).
    let raw = node_ask(
        &boot,
        asker.path(),
        &["--raw", "--temperature", "0", "--max-tokens", "24"],
        RAW_PROMPT,
    );
    assert!(
        raw.status.success(),
        "{}",
        String::from_utf8_lossy(&raw.stderr)
    );
    check_eq!(
        c,
        v["completion"]["text"],
        ask_text(&raw).as_str(),
        "/v1/completions vs node ask --raw"
    );

    // The ollama client, naming the model as people do: by the base of
    // the name its servers announce (`smollm2`, from the GGUF's
    // `general.*` entries), which /api/tags lists whole.
    let o = py::run_json("ollama_check.py", &[&api.base, "smollm2", PROMPT, "24"]);
    eprintln!("ollama_check.py: {:.1?}", t0.elapsed());
    check!(
        c,
        o["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|n| n == MODEL_NAME)),
        "/api/tags via ollama: {}",
        o["tags"]
    );
    // /api/show and /api/ps, as Ollama clients read them.
    let info = &o["show"]["model_info"];
    check_eq!(c, info["general.architecture"], "llama", "{}", o["show"]);
    check_eq!(c, info["general.name"], MODEL_NAME, "{}", o["show"]);
    check_eq!(c, info["llama.block_count"], 30, "{}", o["show"]);
    check_eq!(c, info["llama.context_length"], 512, "{}", o["show"]);
    check_eq!(
        c,
        info["nakshatra.model_id"],
        model_id.as_str(),
        "{}",
        o["show"]
    );
    check_eq!(c, o["show"]["details"]["family"], "llama", "{}", o["show"]);
    check_eq!(
        c,
        o["show"]["capabilities"],
        json!(["completion"]),
        "{}",
        o["show"]
    );
    check_eq!(
        c,
        o["ps"],
        json!([{"model": MODEL_NAME, "context_length": 512}]),
        "/api/ps via ollama"
    );
    check_eq!(
        c,
        o["version"]["status"],
        200,
        "/api/version: {}",
        o["version"]
    );
    check!(
        c,
        o["version"]["body"]["version"].is_string(),
        "{}",
        o["version"]
    );
    check_eq!(
        c,
        o["chat_stream"]["text"],
        want.as_str(),
        "ollama chat stream vs node ask: {}",
        o["chat_stream"]
    );
    check_eq!(c, o["chat_stream"]["done"], true, "{}", o["chat_stream"]);
    check!(
        c,
        o["chat_stream"]["parts"].as_u64() > Some(2),
        "{}",
        o["chat_stream"]
    );
    check_eq!(
        c,
        o["chat"]["text"],
        want.as_str(),
        "ollama chat (stream false): {}",
        o["chat"]
    );
    check_eq!(
        c,
        o["generate_stream"]["text"],
        want.as_str(),
        "ollama generate (template applied) vs node ask: {}",
        o["generate_stream"]
    );
    check_eq!(
        c,
        o["unknown_model"]["status"],
        404,
        "{}",
        o["unknown_model"]
    );

    // Raw NDJSON from /api/chat: one JSON object a line, the last done.
    let mut s = http::post_json_stream(
        &api.url("/api/chat"),
        &json!({"model": model_id, "messages": [{"role": "user", "content": PROMPT}],
                "options": {"temperature": 0, "num_predict": 24}}),
    );
    check_eq!(c, s.status, 200);
    check!(
        c,
        s.header("content-type")
            .is_some_and(|c| c.contains("ndjson")),
        "/api/chat content-type: {:?}",
        s.header("content-type")
    );
    let (mut text, mut last) = (String::new(), Value::Null);
    while let Some(line) = s.next_json_line().expect("an NDJSON line") {
        assert!(last["done"] != true, "a line after done: {line}");
        text.push_str(line["message"]["content"].as_str().unwrap_or_default());
        last = line;
    }
    check_eq!(c, text, want, "raw /api/chat NDJSON");
    check_eq!(c, last["done"], true, "{last}");
    check!(c, last["eval_count"].as_u64() > Some(0), "{last}");
    check!(
        c,
        matches!(last["done_reason"].as_str(), Some("stop" | "length")),
        "{last}"
    );

    // Raw SSE from /v1/chat/completions: the role first with the chain,
    // the finish reason last, then [DONE].
    let mut s = http::post_json_stream(
        &api.url("/v1/chat/completions"),
        &json!({"model": model_id, "messages": [{"role": "user", "content": PROMPT}],
                "temperature": 0, "max_tokens": 24, "stream": true}),
    );
    check_eq!(c, s.status, 200);
    check!(
        c,
        s.header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")),
        "{:?}",
        s.header("content-type")
    );
    let (text, events) = http::read_openai_stream(&mut s).expect("an SSE stream");
    check_eq!(c, text, want, "raw SSE text");
    let first = &events[0];
    check_eq!(c, first["object"], "chat.completion.chunk", "{first}");
    check_eq!(
        c,
        first["choices"][0]["delta"]["role"],
        "assistant",
        "{first}"
    );
    let chain = first["nakshatra"]["chain"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    check_eq!(c, chain.len(), 3, "first chunk's nakshatra.chain: {first}");
    for n in &nodes {
        let id = n
            .addr()
            .rsplit("/p2p/")
            .next()
            .unwrap_or_default()
            .to_string();
        check!(
            c,
            chain.iter().any(|h| h["peer_id"] == id.as_str()),
            "{id} not in {first}"
        );
    }
    let last = events.last().expect("events");
    check!(
        c,
        last["choices"][0]["finish_reason"].is_string(),
        "last chunk: {last}"
    );
    check!(
        c,
        last["nakshatra"]["ttft_s"].as_f64().is_some(),
        "last chunk: {last}"
    );

    // An error before the first token keeps its status even when streaming.
    let r = http::post_json(
        &api.url("/v1/chat/completions"),
        &json!({"model": "f".repeat(64), "messages": [{"role": "user", "content": PROMPT}],
                "stream": true}),
    );
    check_eq!(c, r.status, 404, "streaming, unknown model: {}", r.text());
    check_eq!(
        c,
        r.json()["error"]["code"],
        "model_not_found",
        "{}",
        r.text()
    );
    let r = http::post_json(
        &api.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": -1,
                "stream": true}),
    );
    check_eq!(c, r.status, 400, "streaming, max_tokens -1: {}", r.text());
    check_eq!(c, r.json()["error"]["param"], "max_tokens", "{}", r.text());
    let r = http::post_json(
        &api.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": PROMPT}], "n": 2}),
    );
    check_eq!(c, r.status, 400, "n=2: {}", r.text());
    let r = http::post_json(
        &api.url("/api/chat"),
        &json!({"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}]}),
    );
    check_eq!(c, r.status, 404, "ollama unknown model: {}", r.text());
    check!(
        c,
        r.json()["error"].is_string(),
        "ollama error shape: {}",
        r.text()
    );

    // /metrics: every name of docs/api.md (the hop ones on `node join --api`).
    let names = [
        "nakshatra_api_requests_total",
        "nakshatra_asks_total",
        "nakshatra_asks_in_flight",
        "nakshatra_asker_sessions_open",
        "nakshatra_tokens_total",
        "nakshatra_step_seconds",
        "nakshatra_ttft_seconds",
        "nakshatra_bytes_total",
        "nakshatra_peers_connected",
    ];
    let m = http::get(&api.url("/metrics"));
    check_eq!(c, m.status, 200);
    let metrics = m.text();
    for n in names {
        check!(c, metrics.contains(n), "/metrics lacks {n}:\n{metrics}");
    }
    check!(
        c,
        http::metric(&metrics, "nakshatra_tokens_total").unwrap_or(0.0) > 0.0,
        "no tokens counted:\n{metrics}"
    );
    // Every ask above has ended: no session stays open.
    let idle = wait_for(Duration::from_secs(5), || {
        let m = http::get(&api.url("/metrics")).text();
        (http::metric(&m, "nakshatra_asker_sessions_open") == Some(0.0)).then_some(())
    });
    assert!(
        idle.is_some(),
        "asker sessions still open after every ask ended:\n{}",
        http::get(&api.url("/metrics")).text()
    );

    // `node join --api` answers too, and reports its hop sessions.
    let node_c = nodes[2].api();
    let cm = wait_models(node_c, &model_id, Duration::from_secs(20));
    check_eq!(c, cm["coverage"]["covered"], 30, "{cm}");
    let m = http::get(&node_c.url("/metrics")).text();
    for n in ["nakshatra_hop_sessions_open", "nakshatra_hop_sessions_max"] {
        check!(c, m.contains(n), "node C's /metrics lacks {n}:\n{m}");
    }
    check_eq!(
        c,
        http::metric(&m, "nakshatra_hop_sessions_max"),
        Some(32.0),
        "{m}"
    );
    let r = http::post_json(
        &node_c.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 24}),
    );
    check_eq!(c, r.status, 200, "node C's chat: {}", r.text());
    check_eq!(
        c,
        r.json()["choices"][0]["message"]["content"],
        want.as_str(),
        "node join --api's chat (model left out) vs node ask"
    );

    // Bearer auth: every route but /health wants the key.
    let locked = api_client(dirs[4].path(), &boot, &["--api-key", "secret"]);
    let h = http::get(&locked.url("/health"));
    check_eq!(c, h.status, 200, "/health needs no key: {}", h.text());
    for (auth, want_status) in [
        (None, 401),
        (Some("Bearer wrong"), 401),
        (Some("Bearer secret"), 200),
    ] {
        for path in ["/v1/models", "/metrics", "/api/tags"] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let r = http::request("GET", &locked.url(path), &headers, &[]).expect("GET");
            check_eq!(
                c,
                r.status,
                want_status,
                "{path} with {auth:?}: {}",
                r.text()
            );
            if want_status == 401 && path.starts_with("/v1") {
                check_eq!(
                    c,
                    r.json()["error"]["code"],
                    "invalid_api_key",
                    "{}",
                    r.text()
                );
            }
        }
    }
    let r = http::request(
        "POST",
        &locked.url("/v1/chat/completions"),
        &[("Content-Type", "application/json")],
        json!({"messages": [{"role": "user", "content": PROMPT}]})
            .to_string()
            .as_bytes(),
    )
    .expect("POST");
    check_eq!(c, r.status, 401, "chat without a key: {}", r.text());
    drop(locked);

    // Seeded sampling: node ask's text for the same sampler, bit for bit.
    let sampled = ["--temperature", "0.9", "--seed", "42", "--top-k", "40"];
    let mut args = sampled.to_vec();
    args.extend_from_slice(&["--top-p", "0.95", "--max-tokens", "24"]);
    let o = node_ask(&boot, asker.path(), &args, PROMPT);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = http::post_json(
        &api.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
                "temperature": 0.9, "seed": 42, "top_k": 40, "top_p": 0.95}),
    );
    check_eq!(c, r.status, 200, "seeded chat: {}", r.text());
    check_eq!(
        c,
        r.json()["choices"][0]["message"]["content"],
        ask_text(&o).as_str(),
        "seeded chat (temperature 0.9, seed 42, top_k 40, top_p 0.95) vs node ask"
    );

    // A stop string: the text ends before it, finish_reason "stop".
    if let Some(cut) = want.find("Paris").filter(|&i| i > 0) {
        let body = json!({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
                          "temperature": 0, "stop": ["Paris", "never seen"]});
        let r = http::post_json(&api.url("/v1/chat/completions"), &body);
        check_eq!(c, r.status, 200, "chat with stop: {}", r.text());
        let j = r.json();
        check_eq!(
            c,
            j["choices"][0]["message"]["content"],
            &want[..cut],
            "chat with stop [\"Paris\"]: {}",
            r.text()
        );
        check_eq!(c, j["choices"][0]["finish_reason"], "stop", "{}", r.text());
        let mut body = body;
        body["stream"] = json!(true);
        let mut s = http::post_json_stream(&api.url("/v1/chat/completions"), &body);
        let got = http::read_openai_stream(&mut s);
        check!(
            c,
            got.as_ref().is_ok_and(|(t, _)| t == &want[..cut]),
            "streamed chat with stop [\"Paris\"]: {got:?}"
        );
    }

    // No chain: node C (20..30) killed; once its record expires the API
    // answers 503 with Retry-After.
    let mut nodes = nodes;
    drop(nodes.pop());
    let gone = wait_for(Duration::from_secs(30), || {
        let v = http::get(&api.url("/v1/models")).json();
        let m = v["data"]
            .as_array()?
            .iter()
            .find(|m| m["id"] == model_id.as_str())
            .cloned()?;
        (m["coverage"]["covered"] == 20).then_some(m)
    });
    check!(
        c,
        gone.as_ref().is_some_and(|m| m["coverage"]["gaps"]
            .as_array()
            .is_some_and(|g| !g.is_empty())),
        "blocks 20..30 not shown uncovered with node C killed: {gone:?}"
    );
    let r = http::post_json(
        &api.url("/v1/chat/completions"),
        &json!({"model": model_id, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 4}),
    );
    check_eq!(c, r.status, 503, "no chain: {}", r.text());
    check!(
        c,
        r.header("retry-after").is_some(),
        "503 without Retry-After: {:?}",
        r.headers
    );
    check_eq!(c, r.json()["error"]["code"], "no_chain", "{}", r.text());
    eprintln!("test took {:.1?}", t0.elapsed());
    c.finish();
}

/// The text of one non-streaming greedy chat.
fn chat_once(api: &ApiProc, prompt: &str, max_tokens: u32) -> String {
    let r = http::post_json(
        &api.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": max_tokens}),
    );
    assert_eq!(r.status, 200, "chat {prompt:?}: {}", r.text());
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content: {}", r.text()))
        .to_string()
}

#[test]
fn sixteen_streams_four_disconnect_sessions_return_to_zero() {
    const PROMPTS: [&str; 4] = [
        "What is the capital of France?",
        "Name three colours of the rainbow.",
        "Write one sentence about the sea.",
        "What is two plus two?",
    ];
    let t0 = Instant::now();
    let model = test_model();
    let model = model.to_str().expect("utf-8 model path");
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = three_nodes(model, &dirs[..3], [true, true, true]);
    let api = api_client(dirs[3].path(), &nodes[0].addr(), &[]);
    let model_id = inspect_model_id(model);
    wait_models(&api, &model_id, Duration::from_secs(20));
    let want: Vec<String> = PROMPTS.iter().map(|p| chat_once(&api, p, 32)).collect();
    eprintln!("single answers ({:.1?}): {want:?}", t0.elapsed());

    let start = std::sync::Arc::new(std::sync::Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let url = api.url("/v1/chat/completions");
            let start = start.clone();
            std::thread::spawn(move || {
                let body = json!({"messages": [{"role": "user", "content": PROMPTS[i % 4]}],
                                  "temperature": 0, "max_tokens": 32, "stream": true});
                start.wait();
                // Every hop has room for all 16 (32 sessions, half of them
                // this asker's): each gets its answer at once, no 503.
                let mut s = http::post_json_stream(&url, &body);
                if s.status != 200 {
                    let rest =
                        String::from_utf8_lossy(&s.read_rest().unwrap_or_default()).into_owned();
                    return Err(format!("status {}: {rest}", s.status));
                }
                if i < 4 {
                    for k in 0..3 {
                        match s.next_event() {
                            Ok(Some(_)) => {}
                            other => return Err(format!("event {k}: {other:?}")),
                        }
                    }
                    s.disconnect();
                    Ok((String::new(), Instant::now()))
                } else {
                    http::read_openai_stream(&mut s).map(|(t, _)| (t, Instant::now()))
                }
            })
        })
        .collect();

    // Meanwhile: the hops hold sessions (the gauge works).
    let mut peak = [0.0f64; 3];
    let mut asker_peak = 0.0f64;
    while !threads.iter().all(|t| t.is_finished()) {
        for (k, n) in nodes.iter().enumerate() {
            if let Ok(r) = http::request("GET", &n.api().url("/metrics"), &[], &[]) {
                let v = http::metric(&r.text(), "nakshatra_hop_sessions_open").unwrap_or(0.0);
                peak[k] = peak[k].max(v);
            }
        }
        if let Ok(r) = http::request("GET", &api.url("/metrics"), &[], &[]) {
            let v = http::metric(&r.text(), "nakshatra_asker_sessions_open").unwrap_or(0.0);
            asker_peak = asker_peak.max(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut ended = t0;
    for (i, t) in threads.into_iter().enumerate() {
        let (text, at) = t
            .join()
            .expect("client thread panicked")
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        ended = ended.max(at);
        if i >= 4 {
            assert_eq!(text, want[i % 4], "client {i} ({:?})", PROMPTS[i % 4]);
        }
    }
    eprintln!(
        "16 streams done ({:.1?}); peak hop sessions {peak:?}, peak asker sessions {asker_peak}",
        t0.elapsed()
    );
    assert!(
        peak.iter().all(|&p| p > 0.0) && asker_peak > 0.0,
        "the session gauges never moved: hops {peak:?}, asker {asker_peak}"
    );

    // Every session freed at once: no 60 s park for the four that hung up.
    let poll = || -> Option<(bool, String, String)> {
        let mut seen = Vec::new();
        for n in &nodes {
            let m = http::request("GET", &n.api().url("/metrics"), &[], &[])
                .ok()?
                .text();
            seen.push(http::metric(&m, "nakshatra_hop_sessions_open"));
        }
        let m = http::request("GET", &api.url("/metrics"), &[], &[])
            .ok()?
            .text();
        let asker = http::metric(&m, "nakshatra_asker_sessions_open");
        let in_flight = http::metric(&m, "nakshatra_asks_in_flight");
        let zero =
            seen.iter().all(|s| *s == Some(0.0)) && asker == Some(0.0) && in_flight == Some(0.0);
        let state = format!("hops {seen:?}, asker {asker:?}, asks in flight {in_flight:?}");
        Some((zero, state, m))
    };
    let mut last = String::new();
    let zero = wait_for(Duration::from_secs(10), || {
        let (zero, state, m) = poll()?;
        last = state;
        zero.then_some(m)
    });
    let took = ended.elapsed();
    let Some(m) = zero else {
        // Diagnose: do they come back after the 60 s park, and what did
        // the nodes log?
        let later = wait_for(Duration::from_secs(70), || poll().filter(|p| p.0));
        let logs: Vec<String> = nodes
            .iter()
            .map(|n| {
                let e = n.stderr();
                let lines: Vec<&str> = e.lines().collect();
                lines[lines.len().saturating_sub(25)..].join("\n")
            })
            .collect();
        panic!(
            "sessions did not return to zero within 10 s of the last client: {last}; \
             {} ({:.1?} after the last client);\nnode logs (last lines):\n{}",
            if later.is_some() {
                "they did later"
            } else {
                "nor within 80 s"
            },
            ended.elapsed(),
            logs.join("\n----\n")
        );
    };
    let cancelled = http::metric_labeled(&m, "nakshatra_asks_total", "outcome=\"cancelled\"");
    eprintln!(
        "sessions back to zero {took:.2?} after the last client ended (asks {}, cancelled {cancelled:?})",
        http::metric(&m, "nakshatra_asks_total").unwrap_or(0.0),
    );
    // The four that hung up mid-answer were cancelled, not run to the end.
    assert_eq!(cancelled, Some(4.0), "asks cancelled:\n{m}");
    eprintln!("test took {:.1?}", t0.elapsed());
}
