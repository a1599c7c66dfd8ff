//! Fetch throughput on loopback, with verification: a node started with
//! only the model id fetches the whole model (every piece, 96.6 MB for
//! SmolLM2) from one source, then from two sources in parallel. Prints MB/s
//! from the node's own fetch summary (bytes received / wall time, BLAKE3
//! verification and disk writes included).
//!
//! `cargo bench -p nakshatra-e2e --bench fetch` (after `cargo build
//! --release`). Env: `BENCH_ROUNDS` (3).

use std::time::Duration;

use nakshatra_e2e::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn base(boot: Option<&str>) -> Vec<String> {
    let mut v: Vec<String> = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--threads",
        "1",
        "--max-sessions",
        "1",
        "--ctx-size",
        "256",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(b) = boot {
        v.push("--bootstrap".into());
        v.push(b.into());
    }
    v
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
        .unwrap_or(3);
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
    let one: Vec<(f64, usize)> = (0..rounds).map(|_| fetch_once(&boot, &id)).collect();
    let _b = seeder(1, Some(&boot), "15..30");
    wait_for(Duration::from_secs(15), || {
        status_json(&boot).filter(|v| covered_blocks(v).len() == 30)
    })
    .expect("second seeder announced");
    let two: Vec<(f64, usize)> = (0..rounds).map(|_| fetch_once(&boot, &id)).collect();
    println!("fetch bench: whole SmolLM2-135M Q4_1 (96.6 MB, 32 pieces) on loopback, verified, {rounds} rounds, medians");
    println!(
        "one source   {:>7.0} MB/s   (sources used: {:?})",
        median(one.iter().map(|r| r.0).collect()),
        one.iter().map(|r| r.1).collect::<Vec<_>>()
    );
    println!(
        "two sources  {:>7.0} MB/s   (sources used: {:?})   (target >= 500 MB/s)",
        median(two.iter().map(|r| r.0).collect()),
        two.iter().map(|r| r.1).collect::<Vec<_>>()
    );
}
