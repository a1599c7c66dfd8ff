//! Links through NAT (issue 12): decode tokens/s and hop overhead when the
//! asker reaches the chain's last hop directly, through the relay, or
//! over a hole-punched connection, with and without a simulated delay.
//!
//! The topology is the NAT tests' ([`NatLab`]): a public namespace with
//! the bootstrap and relay node serving 0..15, and a node in a cone-NAT
//! home serving 15..30 (it reserves on the relay once it finds itself
//! unreachable). The same chain is asked from three places, interleaved
//! round by round:
//! - `direct`: the home node's own LAN (the asker runs in its
//!   namespace): the last hop is reached at its LAN address, no NAT in
//!   between;
//! - `relayed`: a home behind a symmetric NAT, where no hole can be
//!   punched: the last hop's tokens come back through the relay;
//! - `punched`: a second cone-NAT home: DCUtR punches a direct connection
//!   before the chain opens.
//!
//! With `BENCH_DELAY_MS` (20) the nodes run with `--test-link-delay-ms`
//! (this kernel has no netem): every activation frame and probe echo a
//! node handles waits that long, which is one delayed link into each hop.
//! The relay's forwarding itself is not delayed, so the relayed column
//! shows the cost of the relay's extra legs at LAN latency; across the
//! internet each extra leg costs a real RTT as well.
//!
//! Each ask checks that the text is the whole model's and that the
//! `chain:` line marks the last hop `(relayed)` exactly in the relayed
//! case.
//!
//! `sudo cargo bench -p nakshatra-e2e --bench nat` (after `cargo build
//! --release --workspace --features nakshatra/fault-injection`; network
//! namespaces need root). Env: `BENCH_ROUNDS` (5), `BENCH_DELAY_MS` (20),
//! `BENCH_TOKENS` (32).

use std::time::{Duration, Instant};

use nakshatra_e2e::*;

const PROMPT: &str = "The capital of France is";
/// The public node's port (TCP, and UDP for QUIC).
const PUBLIC_PORT: u16 = 41000;
/// The home node's port.
const HOME_PORT: u16 = 42000;
/// How long the home node may take to announce its circuit address.
const ANNOUNCE_WITHIN: Duration = Duration::from_secs(90);
/// Where each ask runs from, and how its link to the last hop is made.
const PLACES: [(&str, usize); 3] = [("direct", 0), ("relayed", 1), ("punched", 2)];

/// One place's measurements.
#[derive(Default)]
struct Col {
    tps: Vec<f64>,
    overhead_ms: Vec<f64>,
    setup_s: Vec<f64>,
    same: usize,
    as_labelled: usize,
}

/// The number after `key` in an ask's `stats:` line.
fn stat(stats: &str, key: &str) -> Option<f64> {
    let rest = &stats[stats.find(key)? + key.len()..];
    rest.split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

fn main() {
    let rounds: usize = env_num("BENCH_ROUNDS", 5);
    let delay: u64 = env_num("BENCH_DELAY_MS", 20);
    let tokens: u32 = env_num("BENCH_TOKENS", 32);
    let lab = match NatLab::with_nats("nbench", &[Nat::Cone, Nat::Symmetric, Nat::Cone]) {
        Ok(lab) => lab,
        Err(why) => {
            eprintln!("nat bench skipped: cannot build the NAT lab: {why}");
            return;
        }
    };
    let model = test_model();
    let model = model.to_str().expect("utf-8 path");
    let max_tokens = tokens.to_string();
    let greedy = ["--raw", "--temperature", "0", "--max-tokens", &max_tokens];
    let want = run_reference(model, &greedy, PROMPT);

    println!(
        "NAT links: chain public [0..15) -> cone home [15..30), {tokens} greedy tokens, \
         {rounds} rounds, medians"
    );
    println!(
        "{:>8} {:>8} {:>12} {:>14} {:>8} {:>6} {:>12}",
        "delay", "link", "decode tok/s", "hop overhead", "setup", "exact", "as labelled"
    );
    for d in [0, delay] {
        let ms = d.to_string();
        let dirs: Vec<_> = (0..2)
            .map(|_| tempfile::tempdir().expect("tempdir"))
            .collect();
        let common = |layers: &'static str, listen: String| -> Vec<String> {
            let mut v: Vec<String> = [
                "--model",
                model,
                "--layers",
                layers,
                "--listen",
                &listen,
                "--no-mdns",
                "--threads",
                "1",
                "--ctx-size",
                "512",
                "--record-ttl",
                "8",
                "--refresh",
                "2",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if d > 0 {
                v.extend(["--test-link-delay-ms".to_string(), ms.clone()]);
            }
            v
        };
        let tcp = format!("/ip4/{}/tcp/{PUBLIC_PORT}", NatLab::PUBLIC_IP);
        let quic = format!("/ip4/{}/udp/{PUBLIC_PORT}/quic-v1", NatLab::PUBLIC_IP);
        let mut args = common("0..15", tcp.clone());
        args.extend(["--external-addr".into(), tcp.clone()]);
        args.extend(["--external-addr".into(), quic]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let relay = Proc::join_in(&lab.public.prefix(), dirs[0].path(), &argv);
        let boot = format!("{tcp}/p2p/{}", relay.peer_id());
        let mut args = common(
            "15..30",
            format!("/ip4/{}/tcp/{HOME_PORT}", NatLab::home_ip(0)),
        );
        args.extend(["--bootstrap".into(), boot.clone()]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let home = Proc::join_in(&lab.homes[0].prefix(), dirs[1].path(), &argv);
        let home_id = home.peer_id();
        let relay_part = format!("/p2p/{}/p2p-circuit", relay.peer_id());
        let t0 = Instant::now();
        let ready = wait_for(ANNOUNCE_WITHIN, || {
            status_json_in(&lab.public.prefix(), &boot)
                .filter(|v| covered_blocks(v).len() == 30 && v.to_string().contains(&relay_part))
        });
        if ready.is_none() {
            eprintln!(
                "the home node never announced a circuit address; skipping delay {d} ms\n{}",
                home.stderr()
            );
            continue;
        }
        eprintln!(
            "delay {d} ms: home node reachable through the relay after {:.1} s",
            t0.elapsed().as_secs_f64()
        );

        let mut cols: Vec<Col> = PLACES.iter().map(|_| Col::default()).collect();
        for round in 0..rounds {
            for (k, (label, home_ix)) in PLACES.iter().enumerate() {
                let prefix = lab.homes[*home_ix].prefix();
                let dir = tempfile::tempdir().expect("tempdir");
                let dd = dir.path().to_str().expect("utf-8 path");
                let mut ask = vec!["--data-dir", dd, "node", "ask", "--no-mdns", "--bootstrap"];
                ask.push(&boot);
                ask.extend_from_slice(&greedy);
                ask.push(PROMPT);
                let o = nakshatra_in(&prefix, &ask);
                let err = String::from_utf8_lossy(&o.stderr).into_owned();
                if !o.status.success() {
                    eprintln!("round {round} {label}: ask failed: {err}");
                    continue;
                }
                let c = &mut cols[k];
                if String::from_utf8_lossy(&o.stdout) == want {
                    c.same += 1;
                }
                let chain = err.lines().find(|l| l.starts_with("chain:")).unwrap_or("");
                let last_relayed = chain
                    .split(" -> ")
                    .last()
                    .is_some_and(|h| h.contains(&home_id) && h.ends_with("(relayed)"));
                if last_relayed == (*label == "relayed") {
                    c.as_labelled += 1;
                } else {
                    eprintln!("round {round} {label}: {chain}");
                }
                if std::env::var_os("NAKSHATRA_TEST_ASK_LOG").is_some() {
                    eprintln!("round {round} {label} stderr:\n{err}");
                }
                if let Some(s) = err.lines().find(|l| l.starts_with("stats:")) {
                    c.tps.extend(stat(s, "decode "));
                    c.overhead_ms.extend(stat(s, "hop overhead median "));
                    c.setup_s.extend(stat(s, "setup "));
                }
            }
        }
        for ((label, _), c) in PLACES.iter().zip(&cols) {
            println!(
                "{:>6}ms {:>8} {:>12.1} {:>11.3} ms {:>6.2} s {:>3}/{:<2} {:>9}/{}",
                d,
                label,
                median(c.tps.clone()),
                median(c.overhead_ms.clone()),
                median(c.setup_s.clone()),
                c.same,
                rounds,
                c.as_labelled,
                rounds
            );
        }
        let direct = median(cols[0].tps.clone());
        println!(
            "{:>6}ms ratios to direct: relayed {:.2}x, punched {:.2}x",
            d,
            median(cols[1].tps.clone()) / direct,
            median(cols[2].tps.clone()) / direct
        );
        drop(home);
        drop(relay);
    }
}
