//! An MoE model and a dense one of the same active size, each run whole in
//! one process and as a 3-process chain on loopback: decode tokens/s side
//! by side (interleaved rounds, medians) and the chain/whole ratio.
//!
//! The two models are written by `scripts/gen-test-models.py` with random
//! weights (F32): qwen3 (dense, n_embd 512, n_ff 1536) and qwen3moe
//! (n_embd 512, 8 experts of 768, 2 used: 1536 active), 12 blocks each,
//! split 0..4, 4..8, 8..12. The MoE model's blocks hold 4x the dense
//! model's feed-forward weights, of which each token uses a quarter.
//!
//! Measured (2 cores, 1 thread per process, 64 tokens, 5 rounds): dense
//! 50.1 tok/s whole, 43.3 chained (0.864x); MoE 53.0 and 42.7 (0.806x).
//!
//! `cargo bench -p nakshatra-e2e --bench moe` (after `cargo build
//! --release`). Env: `BENCH_ROUNDS` (5), `BENCH_THREADS` (threads for the
//! whole model and for each node; default 1), `BENCH_TOKENS` (64).

use std::path::{Path, PathBuf};

use nakshatra_e2e::bench::{interleaved, LocalChain};
use nakshatra_e2e::*;

/// Blocks of both models.
const LAYERS: u32 = 12;

/// Writes the benchmark's two models into `dir`.
fn write_models(dir: &Path) -> (PathBuf, PathBuf) {
    let gen = |arch: &str, out: &Path, shape: &[&str]| {
        let layers = LAYERS.to_string();
        let mut args = vec![
            "--py",
            "--arch",
            arch,
            "--out",
            out.to_str().expect("utf-8 path"),
            "--layers",
            &layers,
            "--n-embd",
            "512",
        ];
        args.extend_from_slice(shape);
        gen_models(&args);
    };
    let dense = dir.join("dense-qwen3.gguf");
    let moe = dir.join("moe-qwen3moe.gguf");
    gen("qwen3", &dense, &["--n-ff", "1536"]);
    gen("qwen3moe", &moe, &["--n-expert", "8", "--n-ff-exp", "768"]);
    (dense, moe)
}

/// Whole vs chain decode tokens/s (medians) for one model.
fn measure(model: &Path, rounds: usize, threads: &str, tokens: &str) -> (f64, f64) {
    let model = model.to_str().expect("utf-8 path");
    let blocks = LAYERS as usize;
    let chain = LocalChain::start(
        model,
        &["0..4", "4..8", "8..12"],
        blocks,
        &["--threads", threads],
    );
    let prompt = "In the beginning the universe was created. ".repeat(4);
    let common = ["--raw", "--temperature", "0", "--max-tokens", tokens];
    let (mut whole, mut chained) = (vec![], vec![]);
    let mut run_whole = |warm_up: bool| {
        let s = chain
            .run_whole(threads, &common, &prompt)
            .expect("run stats");
        if !warm_up {
            whole.push(number_after(&s, "decode").expect("decode"));
        }
    };
    let mut ask = |warm_up: bool| {
        let s = chain.ask(&common, &prompt).expect("ask stats");
        if !warm_up {
            chained.push(number_after(&s, "decode").expect("decode"));
        }
    };
    interleaved(rounds, &mut [&mut run_whole, &mut ask]);
    (median(whole), median(chained))
}

fn main() {
    let rounds: usize = env_num("BENCH_ROUNDS", 5);
    let threads: String = env_num("BENCH_THREADS", "1".to_string());
    let tokens: String = env_num("BENCH_TOKENS", "64".to_string());
    let dir = tempfile::tempdir().unwrap();
    let (dense, moe) = write_models(dir.path());
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) / 1_000_000;
    let (dw, dc) = measure(&dense, rounds, &threads, &tokens);
    let (mw, mc) = measure(&moe, rounds, &threads, &tokens);
    println!(
        "moe bench: {LAYERS} blocks split 0..4 | 4..8 | 8..12 | {threads} thread(s) per process | {tokens} tokens | {rounds} interleaved rounds, medians"
    );
    println!(
        "model                         file MB   whole decode   3-hop chain decode   chain/whole"
    );
    println!(
        "qwen3 dense (ff 1536)         {:>7}   {dw:>8.1} tok/s   {dc:>12.1} tok/s   {:>9.3}x",
        size(&dense),
        dc / dw
    );
    println!(
        "qwen3moe (8 x 768, 2 used)    {:>7}   {mw:>8.1} tok/s   {mc:>12.1} tok/s   {:>9.3}x",
        size(&moe),
        mc / mw
    );
}
