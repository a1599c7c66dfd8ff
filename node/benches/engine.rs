//! Whole model vs a 3-way split run in one process: prefill and decode
//! tokens/s measured side by side (interleaved rounds, medians), printed as
//! ratios. Run with `cargo bench -p nakshatra --bench engine`.
//!
//! Env: `NAKSHATRA_TEST_MODEL` (default: the fetch script's cache),
//! `BENCH_ROUNDS` (default 7), `BENCH_THREADS` (default: all cores),
//! `BENCH_PROMPT_TOKENS` (default 256), `BENCH_DECODE` (default 64).

use std::path::{Path, PathBuf};

use nakshatra_node::engine::pipeline::{generate, GenerateParams, LocalChain};
use nakshatra_node::engine::{EngineConfig, SamplerSpec, SliceEngine};

fn env_u32(k: &str, d: u32) -> u32 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // else useful. Both just run the measurement.
    let model = std::env::var("NAKSHATRA_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if !model.exists() {
        eprintln!(
            "model missing at {}: run scripts/fetch-test-model.sh",
            model.display()
        );
        std::process::exit(1);
    }
    let rounds = env_u32("BENCH_ROUNDS", 7).max(1);
    let threads = env_u32("BENCH_THREADS", nakshatra_node::engine::default_threads());
    let n_prompt = env_u32("BENCH_PROMPT_TOKENS", 256) as usize;
    let n_decode = env_u32("BENCH_DECODE", 64);

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = EngineConfig {
        threads,
        ctx_per_session: 1024,
        max_sessions: 1,
        n_ubatch: 512,
        gpu_layers: -1,
        device: None,
    };
    let load = |paths: &[PathBuf]| {
        LocalChain::new(
            paths
                .iter()
                .map(|p| SliceEngine::load(p, None, &cfg).expect("load"))
                .collect(),
        )
        .expect("chain")
    };
    let mut split_paths = Vec::new();
    for (a, b) in [(0, 10), (10, 20), (20, 30)] {
        let out = dir.path().join(format!("{a}-{b}.gguf"));
        nakshatra_slicer::write_slice(&model, a, b, &out).expect("slice");
        split_paths.push(out);
    }
    let mut whole = load(std::slice::from_ref(&model));
    let mut split = load(&split_paths);
    let tok = nakshatra_node::engine::tokenizer::Tokenizer::load(&model).expect("tokenizer");
    let text = "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move. ".repeat(20);
    let mut prompt = tok.tokenize(&text);
    prompt.truncate(n_prompt);
    let params = GenerateParams {
        max_tokens: n_decode,
        sampler: SamplerSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        },
        keep_logits: false,
    };
    let run = |chain: &mut LocalChain| {
        let s = chain.open().expect("session");
        let g = generate(chain, &s, &prompt, &params, |_| false, |_| {}).expect("generate");
        chain.close(s);
        g
    };
    // Warm up both (page in weights, allocate compute buffers).
    run(&mut whole);
    run(&mut split);
    let (mut wp, mut wd, mut sp, mut sd) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        // Alternate which goes first so drift on a shared machine hits both.
        let order: [bool; 2] = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for is_split in order {
            let g = if is_split {
                run(&mut split)
            } else {
                run(&mut whole)
            };
            let (p, d) = if is_split {
                (&mut sp, &mut sd)
            } else {
                (&mut wp, &mut wd)
            };
            p.push(g.prefill_tps());
            d.push(g.decode_tps());
        }
    }
    let (wp, wd, sp, sd) = (median(wp), median(wd), median(sp), median(sd));
    println!(
        "engine bench: {} | {threads} threads | prompt {} tokens | {n_decode} decode steps | {rounds} interleaved rounds, medians",
        model.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        prompt.len()
    );
    println!("whole        prefill {wp:>8.1} tok/s   decode {wd:>7.1} tok/s");
    println!("split 3-way  prefill {sp:>8.1} tok/s   decode {sd:>7.1} tok/s");
    println!(
        "ratio        prefill {:>8.3}x        decode {:>7.3}x   (target >= 0.97x)",
        sp / wp,
        sd / wd
    );
}
