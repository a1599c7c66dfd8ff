//! The 3-process chain against the whole model in one process: prefill and
//! decode tokens/s measured side by side (interleaved rounds, medians) and
//! the per-hop overhead (median and p99 over decode steps) of the chain.
//!
//! `cargo bench -p nakshatra-e2e --bench chain` (after `cargo build
//! --release`). Env: `BENCH_ROUNDS` (5), `BENCH_THREADS` (threads for the
//! whole model and for each node; default 1 — on a shared host the nodes
//! must not oversubscribe the cores), `BENCH_TOKENS` (64).

use std::time::Duration;

use nakshatra_e2e::*;

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = env_or("BENCH_ROUNDS", "5").parse().unwrap_or(5);
    let threads = env_or("BENCH_THREADS", "1");
    let tokens = env_or("BENCH_TOKENS", "64");
    let model = test_model();
    let model = model.to_str().unwrap();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let join = |i: usize, layers: &str, boot: Option<&str>| {
        let mut a = vec![
            "--model",
            model,
            "--layers",
            layers,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--threads",
            &threads,
        ];
        if let Some(b) = boot {
            a.extend_from_slice(&["--bootstrap", b]);
        }
        Proc::join(dirs[i].path(), &a)
    };
    let a = join(0, "0..10", None);
    let boot = a.addr().to_string();
    let _b = join(1, "10..20", Some(&boot));
    let _c = join(2, "20..30", Some(&boot));
    wait_for(Duration::from_secs(30), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    })
    .expect("coverage");
    let prompt = "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move. ".repeat(4);
    let asker = dirs[3].path().to_str().unwrap().to_string();
    let common = ["--raw", "--temperature", "0", "--max-tokens", &tokens];
    let run_whole = || {
        let mut args = vec![
            "--data-dir",
            &asker,
            "run",
            "--model",
            model,
            "--threads",
            &threads,
        ];
        args.extend_from_slice(&common);
        args.push(&prompt);
        stderr_line(&nakshatra(&args), "stats:")
    };
    let run_chain = || {
        let mut args = vec![
            "--data-dir",
            &asker,
            "node",
            "ask",
            "--no-mdns",
            "--bootstrap",
            &boot,
        ];
        args.extend_from_slice(&common);
        args.push(&prompt);
        stderr_line(&nakshatra(&args), "stats:")
    };
    // Warm-up (vocabulary fetch, page cache).
    run_whole();
    run_chain();
    let (mut wp, mut wd, mut cp, mut cd, mut om, mut op) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        let order = if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for whole in order {
            if whole {
                let s = run_whole().expect("run stats");
                wp.push(number_after(&s, "prefill").expect("prefill"));
                wd.push(number_after(&s, "decode").expect("decode"));
            } else {
                let s = run_chain().expect("ask stats");
                cp.push(number_after(&s, "prefill").expect("prefill"));
                cd.push(number_after(&s, "decode").expect("decode"));
                om.push(number_after(&s, "overhead median").expect("median"));
                op.push(number_after(&s, "p99").expect("p99"));
            }
        }
    }
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
