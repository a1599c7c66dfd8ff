//! Fetch throughput on loopback, with verification: a node started with
//! only the model id fetches the whole model (every piece, 96.6 MB for
//! SmolLM2) from one source, then from two sources in parallel. Prints MB/s
//! from the node's own fetch summary (bytes received / wall time, BLAKE3
//! verification and disk writes included).
//!
//! Each configuration first runs one fetch that is printed but not counted
//! (the first fetch after the sources start pays for faulting in their
//! mapped files and, on a VM, for fresh page-cache memory), then
//! `BENCH_ROUNDS` counted ones.
//!
//! `cargo bench -p nakshatra-e2e --bench fetch` (after `cargo build
//! --release`). Env: `BENCH_ROUNDS` (5).

use std::time::Duration;

use nakshatra_e2e::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn base(boot: Option<&str>) -> Vec<String> {
    let mut v = loopback_args(boot);
    v.extend_from_slice(&["--max-sessions", "1", "--ctx-size", "256"]);
    v.into_iter().map(String::from).collect()
}

/// Fetches the whole model into a fresh data dir; returns (MB/s, sources).
fn fetch_once(boot: &str, id: &str) -> (f64, usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = base(Some(boot));
    args.extend(["--model-id", id, "--layers", "0..30"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Proc::join(dir.path(), &args);
    let log = p.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("MB/s) from"))
        .unwrap_or_else(|| panic!("no fetch summary: {log}"))
        .to_string();
    let rate: f64 = line
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let sources: usize = line
        .split("from ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (rate, sources)
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let model = test_model();
    let model = model.to_str().unwrap();
    let o = nakshatra(&["model", "inspect", model, "--json"]);
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("inspect");
    let id = info["id"].as_str().expect("id").to_string();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let seeder = |i: usize, boot: Option<&str>, layers: &str| {
        let mut a = base(boot);
        a.extend(["--model", model, "--layers", layers].map(String::from));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Proc::join(dirs[i].path(), &a)
    };
    let a = seeder(0, None, "0..15");
    let boot = a.addr().to_string();
    let cold_one = fetch_once(&boot, &id).0;
    let one: Vec<(f64, usize)> = (0..rounds).map(|_| fetch_once(&boot, &id)).collect();
    let _b = seeder(1, Some(&boot), "15..30");
    wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    })
    .expect("second seeder announced");
    let cold_two = fetch_once(&boot, &id).0;
    let two: Vec<(f64, usize)> = (0..rounds).map(|_| fetch_once(&boot, &id)).collect();
    println!("fetch bench: whole SmolLM2-135M Q4_1 (96.6 MB, 32 pieces) on loopback, verified, median of {rounds} rounds after one uncounted");
    let show = |name: &str, cold: f64, runs: &[(f64, usize)]| {
        let rates: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.0)).collect();
        println!(
            "{name}  {:>7.0} MB/s   (rounds: {}; uncounted first: {cold:.0}; sources used: {:?})",
            median(runs.iter().map(|r| r.0).collect()),
            rates.join(" "),
            runs.iter().map(|r| r.1).collect::<Vec<_>>()
        );
    };
    show("one source ", cold_one, &one);
    show("two sources", cold_two, &two);
    println!("target >= 500 MB/s; the transport's own ceiling: cargo run --release -p nakshatra-swarm --example stream_bench");
}
