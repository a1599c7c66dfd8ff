//! Speculative decoding over slow links: a 3-process chain whose every
//! leg (the last hop's tokens included) is slowed by the nodes' test-only
//! delay, asked the same greedy question without a draft (the asker
//! sending every step, `--no-ring`, and the chain feeding itself, the
//! ring) and with `--draft` at K = 2, 4, 8 and adaptive, in interleaved
//! rounds (medians of decode tokens/s, ratios to the plain `--no-ring`
//! ask measured in the same rounds). Drafts: the model itself (every
//! draft right: the ceiling), an early-exit draft of its first 27 blocks
//! (`nakshatra model draft`), and a generated 6-block model with random
//! weights sharing its tokenizer (every draft wrong: the floor). Every
//! answer is checked byte for byte against the plain one. Then one node
//! with the whole model, the same delay: asker-driven against the ring
//! (the node feeds itself).
//!
//! `cargo bench -p nakshatra-e2e --features nakshatra/fault-injection
//! --bench speculative` (after `cargo build --release --features
//! nakshatra/fault-injection`). Env: `BENCH_ROUNDS` (3),
//! `BENCH_LINK_MS` (20), `BENCH_TOKENS` (64).

use nakshatra_e2e::bench::{interleaved, LocalChain};
use nakshatra_e2e::*;

fn main() {
    let rounds: usize = env_num("BENCH_ROUNDS", 3);
    let link_ms: String = env_num("BENCH_LINK_MS", "20".to_string());
    let tokens: String = env_num("BENCH_TOKENS", "64".to_string());
    let model = test_model();
    let model = model.to_str().expect("utf-8 model path");
    let chain = LocalChain::start(
        model,
        &["0..10", "10..20", "20..30"],
        30,
        &["--threads", "1", "--test-link-delay-ms", &link_ms],
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let early = dir.path().join("early-exit-27.gguf");
    let early = early.to_str().expect("utf-8 path").to_string();
    let o = nakshatra(&["model", "draft", model, "--blocks", "27", "--out", &early]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let random = family_models().join("llama.gguf");
    let random = random.to_str().expect("utf-8 path").to_string();

    let prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle.";
    let common = ["--json", "--temperature", "0", "--max-tokens", &tokens];
    let arms: Vec<(String, Vec<String>)> = {
        let mut v = vec![
            ("plain".to_string(), vec!["--no-ring".to_string()]),
            ("ring".to_string(), vec![]),
        ];
        for k in ["2", "4", "8", "auto"] {
            v.push((
                format!("self K={k}"),
                vec![
                    "--draft".into(),
                    model.to_string(),
                    "--draft-k".into(),
                    k.into(),
                ],
            ));
        }
        for (name, path) in [("early-exit-27", &early), ("random-6", &random)] {
            v.push((
                format!("{name} K=auto"),
                vec![
                    "--draft".into(),
                    path.clone(),
                    "--draft-k".into(),
                    "auto".into(),
                ],
            ));
        }
        v
    };
    struct Arm {
        tps: Vec<f64>,
        report: Option<serde_json::Value>,
        text: Option<String>,
    }
    let mut results: Vec<Arm> = arms
        .iter()
        .map(|_| Arm {
            tps: vec![],
            report: None,
            text: None,
        })
        .collect();
    {
        let cells: Vec<std::cell::RefCell<&mut Arm>> =
            results.iter_mut().map(std::cell::RefCell::new).collect();
        let mut fns: Vec<Box<dyn FnMut(bool)>> = arms
            .iter()
            .zip(&cells)
            .map(|((_, extra), cell)| {
                let chain = &chain;
                let common = &common;
                Box::new(move |warm_up: bool| {
                    let mut a: Vec<&str> = common.to_vec();
                    a.extend(extra.iter().map(String::as_str));
                    let o = chain.ask_output(&a, prompt);
                    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                    let v: serde_json::Value =
                        serde_json::from_slice(&o.stdout).expect("node ask --json");
                    let mut arm = cell.borrow_mut();
                    arm.text = v["text"].as_str().map(str::to_string);
                    if !warm_up {
                        arm.tps
                            .push(v["timings"]["decode_tps"].as_f64().unwrap_or(0.0));
                        arm.report = Some(v["timings"]["speculative"].clone());
                    }
                }) as Box<dyn FnMut(bool)>
            })
            .collect();
        let mut refs: Vec<&mut dyn FnMut(bool)> = fns.iter_mut().map(|f| &mut **f as _).collect();
        interleaved(rounds, &mut refs);
    }
    let plain_tps = median(results[0].tps.clone());
    let plain_text = results[0].text.clone();
    println!(
        "speculative decoding, 3 hops, {link_ms} ms on every leg, {tokens} greedy tokens, {rounds} rounds (medians):"
    );
    for ((name, _), arm) in arms.iter().zip(&results) {
        let tps = median(arm.tps.clone());
        let same = arm.text == plain_text;
        let spec = match &arm.report {
            Some(r) if !r.is_null() => format!(
                "acceptance {:.2}, {:.2} tokens/pass, mean K {:.1}",
                r["acceptance"].as_f64().unwrap_or(0.0),
                r["tokens_per_step"].as_f64().unwrap_or(0.0),
                r["mean_k"].as_f64().unwrap_or(0.0)
            ),
            _ => "no draft".to_string(),
        };
        println!(
            "  {name:<20} decode {tps:6.1} tok/s  {:.2}x plain  {spec}  text {}",
            tps / plain_tps,
            if same { "identical" } else { "DIFFERS" }
        );
        assert!(same, "{name}: the answer differs from the plain ask's");
    }
    drop(chain);

    // One node with the whole model, 20 ms between it and the asker: in
    // the ring the node feeds itself, and the asker's distance is paid
    // once, not per token.
    let one = LocalChain::start(
        model,
        &["0..30"],
        30,
        &["--threads", "1", "--test-link-delay-ms", &link_ms],
    );
    let no_ring: Vec<&str> = common.iter().copied().chain(["--no-ring"]).collect();
    let (mut plain, mut ring): ((Vec<f64>, _), (Vec<f64>, _)) = ((vec![], None), (vec![], None));
    {
        let mut a = |warm_up: bool| {
            let (tps, text) = decode_of(&one, &no_ring, prompt);
            plain.1 = text;
            if !warm_up {
                plain.0.push(tps);
            }
        };
        let mut b = |warm_up: bool| {
            let (tps, text) = decode_of(&one, &common, prompt);
            ring.1 = text;
            if !warm_up {
                ring.0.push(tps);
            }
        };
        interleaved(rounds, &mut [&mut a, &mut b]);
    }
    let (plain_text, ring_text) = (plain.1, ring.1);
    let (plain, ring) = (plain.0, ring.0);
    let (p, r) = (median(plain), median(ring));
    println!(
        "one hop (the whole model on one node), {link_ms} ms to the asker: asker-driven {p:.1} tok/s, ring {r:.1} tok/s ({:.2}x), text {}",
        r / p,
        if ring_text == plain_text { "identical" } else { "DIFFERS" }
    );
    assert_eq!(ring_text, plain_text, "the one-hop ring's answer differs");
}

/// Decode tokens/s and text of one `node ask --json` through `chain`.
fn decode_of(chain: &LocalChain, args: &[&str], prompt: &str) -> (f64, Option<String>) {
    let o = chain.ask_output(args, prompt);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("node ask --json");
    (
        v["timings"]["decode_tps"].as_f64().unwrap_or(0.0),
        v["text"].as_str().map(str::to_string),
    )
}
