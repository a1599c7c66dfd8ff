//! The 3-process chain against the whole model in one process: prefill and
//! decode tokens/s measured side by side (interleaved rounds, medians) and
//! the per-hop overhead (median and p99 over decode steps) of the chain.
//!
//! `cargo bench -p nakshatra-e2e --bench chain` (after `cargo build
//! --release`). Env: `BENCH_ROUNDS` (5), `BENCH_THREADS` (threads for the
//! whole model and for each node; default 1 — on a shared host the nodes
//! must not oversubscribe the cores), `BENCH_TOKENS` (64).

use nakshatra_e2e::bench::{interleaved, LocalChain};
use nakshatra_e2e::*;

fn main() {
    let rounds: usize = env_num("BENCH_ROUNDS", 5);
    let threads: String = env_num("BENCH_THREADS", "1".to_string());
    let tokens: String = env_num("BENCH_TOKENS", "64".to_string());
    let model = test_model();
    let model = model.to_str().expect("utf-8 model path");
    let chain = LocalChain::start(
        model,
        &["0..10", "10..20", "20..30"],
        30,
        &["--threads", &threads],
    );
    let prompt = "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move. ".repeat(4);
    let common = ["--raw", "--temperature", "0", "--max-tokens", &tokens];
    let (mut wp, mut wd, mut cp, mut cd, mut om, mut op) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    interleaved(
        rounds,
        |warm_up| {
            let s = chain
                .run_whole(&threads, &common, &prompt)
                .expect("run stats");
            if !warm_up {
                wp.push(number_after(&s, "prefill").expect("prefill"));
                wd.push(number_after(&s, "decode").expect("decode"));
            }
        },
        |warm_up| {
            let s = chain.ask(&common, &prompt).expect("ask stats");
            if !warm_up {
                cp.push(number_after(&s, "prefill").expect("prefill"));
                cd.push(number_after(&s, "decode").expect("decode"));
                om.push(number_after(&s, "overhead median").expect("median"));
                op.push(number_after(&s, "p99").expect("p99"));
            }
        },
    );
    let (wp, wd, cp, cd) = (median(wp), median(wd), median(cp), median(cd));
    println!("chain bench: SmolLM2-135M Q4_1 | {threads} thread(s) per process | {tokens} tokens | {rounds} interleaved rounds, medians");
    println!("whole (1 process)     prefill {wp:>8.1} tok/s   decode {wd:>7.1} tok/s");
    println!("chain (3 processes)   prefill {cp:>8.1} tok/s   decode {cd:>7.1} tok/s");
    println!("ratio                 prefill {:>8.3}x        decode {:>7.3}x   (targets >= 0.95x, >= 0.90x)", cp / wp, cd / wd);
    println!(
        "hop overhead          median {:.3} ms   p99 {:.3} ms   (target median < 0.3 ms)",
        median(om),
        median(op)
    );
}
