//! The HTTP API under load, on a 3-node loopback swarm and a client-only
//! `nakshatra api`: requests/s and tokens/s for 1, 8 and 32 concurrent
//! streaming clients (greedy, 32 tokens each), and the time to first
//! token through the API against `node ask`'s, measured side by side in
//! interleaved rounds (medians).
//!
//! `cargo bench -p nakshatra-e2e --bench api` (after `cargo build
//! --release`). Env: `BENCH_CLIENTS` (`1,8,32`), `BENCH_REQUESTS` (streams
//! each client makes one after another; 3), `BENCH_TOKENS` (32),
//! `BENCH_ROUNDS` (time-to-first-token rounds; 5), `BENCH_THREADS`
//! (llama threads per node; 1), `BENCH_MAX_SESSIONS` (per node; 64 — one
//! asker identity gets half a hop's sessions, so 32 clients need 64).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nakshatra_e2e::bench::LocalChain;
use nakshatra_e2e::http::{self, ApiProc};
use nakshatra_e2e::*;
use serde_json::json;

const PROMPTS: [&str; 4] = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is two plus two?",
];

/// 503 answers retried (printed with each load level).
static RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One streamed chat: (time to the first `data:` event, time to the first
/// content, completion tokens, total time).
fn one_stream(url: &str, prompt: &str, tokens: u32) -> (f64, f64, u64, f64) {
    let body = json!({"messages": [{"role": "user", "content": prompt}],
                      "temperature": 0, "max_tokens": tokens, "stream": true,
                      "stream_options": {"include_usage": true}});
    // A 503 (+ Retry-After: every hop busy) is retried, as OpenAI's client
    // does; the time counts from the first try.
    let mut tries = 0;
    let t0 = std::time::Instant::now();
    let mut s = loop {
        let mut s = http::post_json_stream(url, &body);
        if s.status == 200 {
            break s;
        }
        let rest = String::from_utf8_lossy(&s.read_rest().unwrap_or_default()).into_owned();
        tries += 1;
        assert!(s.status == 503 && tries <= 5, "status {}: {rest}", s.status);
        RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(1));
    };
    let sent = if tries == 0 { s.sent_at() } else { t0 };
    let (mut first_event, mut first_token, mut used) = (None, None, None);
    loop {
        let ev = s.next_event().expect("read an event").expect("[DONE]");
        first_event.get_or_insert_with(|| sent.elapsed().as_secs_f64());
        if ev == "[DONE]" {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&ev).expect("a JSON event");
        assert!(v.get("error").is_none(), "error event: {ev}");
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            first_token.get_or_insert_with(|| sent.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            used = Some(n);
        }
    }
    (
        first_event.unwrap_or(f64::NAN),
        first_token.unwrap_or(f64::NAN),
        used.expect("a usage chunk (include_usage)"),
        sent.elapsed().as_secs_f64(),
    )
}

fn main() {
    let clients: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let per_client: usize = env_num("BENCH_REQUESTS", 3);
    let tokens: u32 = env_num("BENCH_TOKENS", 32);
    let rounds: usize = env_num("BENCH_ROUNDS", 5);
    let threads: String = env_num("BENCH_THREADS", 1u32).to_string();
    let max_sessions: String = env_num("BENCH_MAX_SESSIONS", 64u32).to_string();
    let model = test_model();
    let model = model.to_str().expect("utf-8 model path");
    let chain = LocalChain::start(
        model,
        &["0..10", "10..20", "20..30"],
        30,
        &[
            "--threads",
            &threads,
            "--max-sessions",
            &max_sessions,
            "--ctx-size",
            "512",
        ],
    );
    let boot = chain.boot.clone();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let api = ApiProc::spawn(
        dirs[0].path(),
        &[
            "api",
            "--listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--bootstrap",
            &boot,
        ],
        false,
        Duration::from_secs(60),
    );
    let url = api.url("/v1/chat/completions");
    wait_for(Duration::from_secs(30), || {
        let r = http::request("GET", &api.url("/v1/models"), &[], &[]).ok()?;
        (r.json()["data"][0]["coverage"]["covered"] == 30).then_some(())
    })
    .expect("the API never saw the model covered");
    let asker = dirs[1].path().to_str().expect("utf-8").to_string();
    let tok = tokens.to_string();
    let ask_args = |prompt: &'static str, json: bool| {
        let mut v = vec![
            "--data-dir".to_string(),
            asker.clone(),
            "node".into(),
            "ask".into(),
            "--no-mdns".into(),
            "--bootstrap".into(),
            boot.clone(),
            "--temperature".into(),
            "0".into(),
            "--max-tokens".into(),
            tok.clone(),
        ];
        if json {
            v.push("--json".into());
        }
        v.push(prompt.into());
        v
    };
    // `node ask`: process start to the first byte of the answer on stdout.
    let ask_first_byte = |prompt: &'static str| -> f64 {
        let t = Instant::now();
        let mut child = Command::new(nakshatra_bin())
            .args(ask_args(prompt, false))
            .env("RUST_LOG", "warn,libp2p_kad=error,llama-cpp-2=error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn node ask");
        let mut out = child.stdout.take().expect("stdout");
        let mut b = [0u8; 1];
        let n = out.read(&mut b).expect("read node ask's stdout");
        let first = t.elapsed().as_secs_f64();
        let mut rest = Vec::new();
        let _ = out.read_to_end(&mut rest);
        let st = child.wait().expect("wait node ask");
        assert!(n == 1 && st.success(), "node ask failed ({st})");
        first
    };
    // `node ask --json`: its own setup and prefill times.
    let ask_json = |prompt: &'static str| -> (f64, f64) {
        let args = ask_args(prompt, true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = nakshatra(&args);
        assert!(
            o.status.success(),
            "node ask --json: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json output");
        (
            v["timings"]["setup_s"].as_f64().unwrap_or(f64::NAN),
            v["timings"]["prefill_s"].as_f64().unwrap_or(f64::NAN),
        )
    };

    // Warm-up: vocabulary fetch, page cache, the API's model cache.
    one_stream(&url, PROMPTS[0], tokens);
    ask_first_byte(PROMPTS[0]);
    RETRIES.store(0, std::sync::atomic::Ordering::Relaxed);

    println!(
        "api bench: SmolLM2-135M Q4_1 | 3 nodes x {threads} thread(s), --max-sessions {max_sessions} | \
         greedy, {tokens} tokens a request | {per_client} streams per client"
    );
    println!(
        "{:>8} {:>10} {:>12} {:>10} {:>14} {:>16}",
        "clients", "requests", "requests/s", "tokens/s", "ttft median s", "request median s"
    );
    for &n in &clients {
        let start = Arc::new(Barrier::new(n + 1));
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let url = url.clone();
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    (0..per_client)
                        .map(|r| one_stream(&url, PROMPTS[(i + r) % 4], tokens))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        let results: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect();
        let wall = t.elapsed().as_secs_f64();
        let reqs = results.len();
        let toks: u64 = results.iter().map(|r| r.2).sum();
        let retried = RETRIES.swap(0, std::sync::atomic::Ordering::Relaxed);
        println!(
            "{n:>8} {reqs:>10} {:>12.2} {:>10.1} {:>14.3} {:>16.3}{}",
            reqs as f64 / wall,
            toks as f64 / wall,
            median(results.iter().map(|r| r.1).collect()),
            median(results.iter().map(|r| r.3).collect()),
            if retried > 0 {
                format!("   ({retried} answers 503, retried)")
            } else {
                String::new()
            }
        );
    }

    // Time to first token, one request at a time, interleaved rounds.
    let (mut api_event, mut api_token, mut ask_byte, mut setup, mut setup_prefill) =
        (vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        let prompt = PROMPTS[r % 4];
        let api_first = r % 2 == 0;
        for api_turn in [api_first, !api_first] {
            if api_turn {
                let (e, t, _, _) = one_stream(&url, prompt, tokens);
                api_event.push(e);
                api_token.push(t);
            } else {
                ask_byte.push(ask_first_byte(prompt));
            }
        }
        let (s, p) = ask_json(prompt);
        setup.push(s);
        setup_prefill.push(s + p);
    }
    let api_t = median(api_token.clone());
    let ask_t = median(ask_byte.clone());
    println!("time to first token ({rounds} interleaved rounds, medians):");
    println!(
        "  api (POST to first data: event)          {:>8.3} s",
        median(api_event)
    );
    println!("  api (POST to first token's data: event)  {api_t:>8.3} s");
    println!("  node ask (process start to first byte)  {ask_t:>8.3} s");
    println!(
        "  node ask --json: setup {:.3} s, setup + prefill {:.3} s",
        median(setup),
        median(setup_prefill)
    );
    println!(
        "  ratio api / node ask                     {:>8.3}x",
        api_t / ask_t
    );
}
