//! Speculative decoding through a chain (issue 16): three real `node
//! join` processes on 127.0.0.1, each link slowed by the nodes' test-only
//! delay (every leg, the last hop's tokens included), and `node ask
//! --draft`: the answer is byte-identical to the plain ask's, greedy and
//! sampled, with the model as its own draft (nearly every draft accepted,
//! so several tokens come back per pass) and with an early-exit draft
//! from `nakshatra model draft` (few accepted: still identical); the same
//! through `nakshatra api --draft` and `node join --api --draft`. A slice
//! or a draft of another vocabulary is refused with a clear error.

use nakshatra_e2e::bench::LocalChain;
use nakshatra_e2e::*;

const PROMPT: &str = "The capital of France is";

fn json_of(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "node ask failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("node ask --json prints JSON")
}

fn text(v: &serde_json::Value) -> &str {
    v["text"].as_str().expect("text")
}

/// An API's greedy completion of [`PROMPT`] is `want`, and its /metrics
/// count at least 20 drafted tokens accepted on the way.
fn drafted_completion_is(api: &http::ApiProc, want: &str) {
    let r = http::post_json(
        &api.url("/v1/completions"),
        &serde_json::json!({"prompt": PROMPT, "max_tokens": 40, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let completion = r.json();
    assert_eq!(
        completion["choices"][0]["text"].as_str(),
        Some(want),
        "{completion}"
    );
    let metrics = http::get(&api.url("/metrics")).text();
    let accepted: f64 = metrics
        .lines()
        .find(|l| l.starts_with("nakshatra_draft_tokens_total{outcome=\"accepted\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accepted drafts counted:\n{metrics}"));
    assert!(accepted >= 20.0, "{metrics}");
}

#[test]
fn drafted_answers_are_the_chains_own_over_slow_links() {
    let model = test_model();
    let model = model.to_str().expect("utf-8 path");
    let chain = LocalChain::start(
        model,
        &["0..10", "10..20", "20..30"],
        30,
        &["--threads", "1", "--test-link-delay-ms", "20"],
    );
    let dir = tempfile::tempdir().unwrap();
    let early = dir.path().join("early-exit-27.gguf");
    let early = early.to_str().unwrap();
    let o = nakshatra(&["model", "draft", model, "--blocks", "27", "--out", early]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("27 of 30 blocks"));

    let greedy = [
        "--json",
        "--raw",
        "--temperature",
        "0",
        "--max-tokens",
        "40",
    ];
    let plain = json_of(&chain.ask_output(&greedy, PROMPT));
    assert!(plain["timings"]["speculative"].is_null());
    let plain_steps = plain["timings"]["decode_steps"].as_u64().unwrap();
    assert!(plain_steps >= 30, "{plain}");

    let with = |draft: &str, k: &str, base: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(&["--draft", draft, "--draft-k", k]);
        json_of(&chain.ask_output(&a, PROMPT))
    };
    // The model as its own draft: the drafts are what the chain would
    // say, so passes carry several tokens each.
    let own = with(model, "4", &greedy);
    assert_eq!(text(&own), text(&plain), "{own}");
    let spec = &own["timings"]["speculative"];
    assert_eq!(spec["k"], "4");
    assert!(spec["acceptance"].as_f64().unwrap() > 0.8, "{spec}");
    assert!(spec["tokens_per_step"].as_f64().unwrap() > 3.0, "{spec}");
    let steps = own["timings"]["decode_steps"].as_u64().unwrap();
    assert!(
        steps * 3 <= plain_steps,
        "{steps} passes against {plain_steps}: {spec}"
    );

    // An early-exit draft guesses worse; adaptive K, same answer.
    let early_auto = with(early, "auto", &greedy);
    assert_eq!(text(&early_auto), text(&plain), "{early_auto}");
    assert_eq!(early_auto["timings"]["speculative"]["k"], "auto");

    // Sampling: each position is drawn as its one-token step would draw
    // it, so the text is the plain ask's for the same seed.
    let sampled = [
        "--json",
        "--raw",
        "--temperature",
        "0.9",
        "--seed",
        "7",
        "--max-tokens",
        "32",
    ];
    let plain_sampled = json_of(&chain.ask_output(&sampled, PROMPT));
    let own_sampled = with(model, "auto", &sampled);
    assert_eq!(text(&own_sampled), text(&plain_sampled), "{own_sampled}");
    assert_ne!(
        text(&plain_sampled),
        text(&plain),
        "the sampled run samples"
    );

    // The API drafts for every request whose model fits: the completion
    // is `node ask`'s, and /metrics counts the drafts.
    let api_dir = tempfile::tempdir().unwrap();
    let api = http::ApiProc::spawn(
        api_dir.path(),
        &[
            "api",
            "--listen",
            "127.0.0.1:0",
            "--no-mdns",
            "--bootstrap",
            &chain.boot,
            "--draft",
            model,
            "--draft-k",
            "4",
        ],
        false,
        std::time::Duration::from_secs(60),
    );
    drafted_completion_is(&api, text(&plain));
    drop(api);

    // A slice is no draft: it cannot turn tokens into logits alone.
    let slice = dir.path().join("slice.gguf");
    let o = nakshatra(&[
        "slice",
        model,
        "--layers",
        "0..10",
        "--out",
        slice.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let refused = |draft: &std::path::Path, why: &str| {
        let mut a = greedy.to_vec();
        a.extend_from_slice(&["--draft", draft.to_str().unwrap()]);
        let o = chain.ask_output(&a, PROMPT);
        assert!(!o.status.success());
        assert!(o.stdout.is_empty(), "no token before the refusal");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{err}");
    };
    refused(&slice, "not a whole model");

    // A serving node's own API (`node join --api --draft`) drafts too.
    let join_dir = tempfile::tempdir().unwrap();
    let mut args = vec!["node", "join"];
    args.extend(loopback_args(Some(&chain.boot)));
    args.extend_from_slice(&[
        "--model",
        model,
        "--layers",
        "20..30",
        "--api",
        "127.0.0.1:0",
    ]);
    args.extend_from_slice(&["--draft", model, "--draft-k", "4"]);
    let api = http::ApiProc::spawn(
        join_dir.path(),
        &args,
        true,
        std::time::Duration::from_secs(90),
    );
    drafted_completion_is(&api, text(&plain));
    drop(api);
    // A model with another vocabulary (Gemma 3's 262,144 tokens; fetched
    // by `scripts/fetch-family-models.sh`, as CI does) is refused before
    // any token.
    let gemma = repo_root().join(".cache/models/gemma-3-270m-q4_k_m.gguf");
    if gemma.exists() {
        refused(&gemma, "does not share the model's vocabulary");
    } else {
        eprintln!(
            "skipped the vocabulary check: {} is missing",
            gemma.display()
        );
    }
}
