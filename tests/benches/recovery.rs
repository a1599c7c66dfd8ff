//! Recovery when a hop dies mid-answer (issue 11), and throughput under
//! concurrent asks.
//!
//! 1. Six nodes on loopback, two for each of 0..10, 10..20, 20..30 (one
//!    thread each, a simulated link delay so that an answer takes
//!    seconds). `BENCH_KILLS` asks of 64 greedy tokens for each of two
//!    modes, interleaved: `kept` (the product: the hops still up resume
//!    their part of the session and answer the replay from their history)
//!    and `fresh` (the baseline: the repaired chain gets a new session id,
//!    so every hop computes the replay; hidden test flag
//!    `--test-fresh-recovery`). During each ask, a hop of its chain (first,
//!    middle, last in turn) is SIGKILLed after a different amount of text
//!    has streamed, then restarted for the next round. Per kill: detection
//!    (the kill to the asker's "the chain broke" log line), re-plan (from
//!    there to the new `chain:` line: planning, opening the new chain),
//!    replay (the new chain catching up, from the `recovered:` line),
//!    tokens replayed; medians and maxima per mode, and the ratio of the
//!    median replay times.
//! 2. Three nodes (0..10, 10..20, 20..30, `--max-sessions 8`, no delay):
//!    decode tokens/s with 1, 8 and 32 asks at once (32 tokens each):
//!    per ask (median) and in all (tokens over wall time).
//!
//! `cargo bench -p nakshatra-e2e --bench recovery` (after `cargo build
//! --release`). Env: `BENCH_KILLS` (10), `BENCH_DELAY_MS` (15).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nakshatra_e2e::*;

const PROMPT: &str = "The capital of France is";

/// One mode's measurements, milliseconds (tokens for `replayed`).
#[derive(Default)]
struct Stats {
    detect: Vec<f64>,
    replan: Vec<f64>,
    replay: Vec<f64>,
    replayed: Vec<f64>,
    same: usize,
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn join(
    model: &str,
    dir: &std::path::Path,
    range: &str,
    boot: Option<&str>,
    extra: &[&str],
) -> Proc {
    let mut args = loopback_args(boot);
    args.extend_from_slice(&["--model", model, "--layers", range]);
    args.extend_from_slice(&["--ctx-size", "512", "--record-ttl", "8", "--refresh", "2"]);
    args.extend_from_slice(extra);
    Proc::join(dir, &args)
}

/// One ask, `--json`, whose stdout and stderr are read as they come.
struct Ask {
    child: std::process::Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<String>>,
}

impl Ask {
    fn start(boot: &str, dir: &std::path::Path, extra: &[&str]) -> Ask {
        let mut child = Command::new(nakshatra_bin())
            .arg("--data-dir")
            .arg(dir)
            .args(["node", "ask", "--no-mdns", "--bootstrap", boot, "--raw"])
            .args(["--temperature", "0", "--max-tokens", "64"])
            .args(extra)
            .arg(PROMPT)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node ask");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut o, mut e) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let sink = stdout.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 256];
            while let Ok(n @ 1..) = o.read(&mut b) {
                sink.lock().unwrap().extend_from_slice(&b[..n]);
            }
        });
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut b = [0u8; 256];
            while let Ok(n @ 1..) = e.read(&mut b) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&b[..n]));
            }
        });
        Ask {
            child,
            stdout,
            stderr,
        }
    }

    fn err(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

fn main() {
    let kills: usize = env_num("BENCH_KILLS", 10);
    let delay: u64 = env_num("BENCH_DELAY_MS", 15);
    let delay = delay.to_string();
    let model = test_model();
    let model = model.to_str().unwrap();
    let want = run_reference(
        model,
        &["--raw", "--temperature", "0", "--max-tokens", "64"],
        PROMPT,
    );

    // 1. Kills.
    let ranges = ["0..10", "10..20", "20..30", "0..10", "10..20", "20..30"];
    let dirs: Vec<_> = ranges
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let extra = [
        "--max-sessions",
        "4",
        "--test-link-delay-ms",
        delay.as_str(),
    ];
    let mut nodes: Vec<Proc> = Vec::new();
    let mut boot: Option<String> = None;
    for (r, d) in ranges.iter().zip(&dirs) {
        let p = join(model, d.path(), r, boot.as_deref(), &extra);
        boot.get_or_insert_with(|| p.addr().to_string());
        nodes.push(p);
    }
    let mut boot = boot.unwrap_or_default();
    const MODES: [&str; 2] = ["kept", "fresh"];
    let mut stats: [Stats; 2] = Default::default();
    println!("recovery bench: SmolLM2-135M Q4_1 | 6 nodes, 1 thread each, {delay} ms simulated link delay | 64 greedy tokens per ask");
    println!("kill  mode   hop  streamed B  detect ms  re-plan ms  replay ms  tokens replayed  same text");
    for k in 0..kills * 2 {
        let (m, round) = (k % 2, k / 2);
        let ask_extra: &[&str] = if m == 1 {
            &["--test-fresh-recovery"]
        } else {
            &[]
        };
        let asker = tempfile::tempdir().unwrap();
        let mut ask = Ask::start(&boot, asker.path(), ask_extra);
        // An ask right after a restart may find the swarm still settling:
        // it fails at once, and is asked again.
        let t = Instant::now();
        let chain = loop {
            let line = ask
                .err()
                .lines()
                .find(|l| l.starts_with("chain: "))
                .map(str::to_string);
            if let Some(l) = line {
                break l
                    .trim_start_matches("chain: ")
                    .split(" -> ")
                    .filter_map(|h| h.split_whitespace().next().map(str::to_string))
                    .collect::<Vec<_>>();
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "no chain line: {}",
                ask.err()
            );
            if matches!(ask.child.try_wait(), Ok(Some(_))) {
                eprintln!("ask {k} ended early, asking again: {}", ask.err());
                std::thread::sleep(Duration::from_secs(1));
                ask = Ask::start(&boot, asker.path(), ask_extra);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let hop = round % chain.len();
        let at_bytes = 4 + 12 * (round / chain.len());
        wait_for(Duration::from_secs(60), || {
            (ask.stdout.lock().unwrap().len() >= at_bytes).then_some(())
        })
        .expect("text streamed");
        let i = nodes
            .iter()
            .position(|p| p.peer_id() == chain[hop])
            .expect("a node of the swarm");
        nodes[i].kill();
        let killed = Instant::now();
        // Poll the asker's stderr: when it saw the break, printed the new
        // chain, and printed the recovery.
        let (mut broke, mut rechained, mut recovered) = (None, None, None);
        let mut child = ask.child;
        while killed.elapsed() < Duration::from_secs(120) && matches!(child.try_wait(), Ok(None)) {
            let e = ask.stderr.lock().unwrap().clone();
            let now = killed.elapsed().as_secs_f64();
            if broke.is_none() && e.contains("the chain broke mid-answer") {
                broke = Some(now);
            }
            if rechained.is_none() && e.matches("chain: ").count() >= 2 {
                rechained = Some(now);
            }
            if recovered.is_none() && e.contains("recovered:") {
                recovered = Some(now);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        std::thread::sleep(Duration::from_millis(200));
        let err = ask.stderr.lock().unwrap().clone();
        let out = String::from_utf8_lossy(&ask.stdout.lock().unwrap()).into_owned();
        let (n, rs) = err
            .lines()
            .find(|l| l.starts_with("recovered:"))
            .map(|l| {
                let field = |after: &str| -> f64 {
                    l.split(after)
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(f64::NAN)
                };
                (field("replayed "), field(" tokens in "))
            })
            .unwrap_or((f64::NAN, f64::NAN));
        let d = broke.unwrap_or(f64::NAN);
        let p = rechained.unwrap_or(f64::NAN) - d;
        let same = out.trim_end() == want.trim_end() && recovered.is_some();
        println!(
            "{k:>4}  {:<5}  {hop:>3}  {at_bytes:>10}  {:>9.0}  {:>10.0}  {:>9.0}  {n:>15}  {same}",
            MODES[m],
            d * 1e3,
            p * 1e3,
            rs * 1e3
        );
        let st = &mut stats[m];
        st.detect.push(d * 1e3);
        st.replan.push(p * 1e3);
        st.replay.push(rs * 1e3);
        st.replayed.push(n);
        st.same += usize::from(same);
        // Restarted through a node that is up (the killed one may have
        // been the bootstrap node), which askers bootstrap from next.
        boot = nodes[(i + 1) % nodes.len()].addr().to_string();
        nodes[i] = join(model, dirs[i].path(), ranges[i], Some(&boot), &extra);
        wait_for(Duration::from_secs(30), || {
            status_json(&boot).filter(|v| [0, 15, 25].iter().all(|b| holders(v, *b).len() == 2))
        });
    }
    for (mode, st) in MODES.iter().zip(&stats) {
        println!(
            "{mode:<5}: detection ms: median {:.0}, max {:.0} | re-plan ms: median {:.0}, max {:.0} | replay ms: median {:.0}, max {:.0} | tokens replayed: median {:.0} | same text {}/{}",
            median(st.detect.clone()),
            max(&st.detect),
            median(st.replan.clone()),
            max(&st.replan),
            median(st.replay.clone()),
            max(&st.replay),
            median(st.replayed.clone()),
            st.same,
            st.replay.len()
        );
    }
    println!(
        "replay, kept / fresh (medians): {:.2}x",
        median(stats[0].replay.clone()) / median(stats[1].replay.clone())
    );
    drop(nodes);

    // 2. Throughput under concurrent asks.
    let tdirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = join(
        model,
        tdirs[0].path(),
        "0..10",
        None,
        &["--max-sessions", "8"],
    );
    let tboot = a.addr().to_string();
    let _b = join(
        model,
        tdirs[1].path(),
        "10..20",
        Some(&tboot),
        &["--max-sessions", "8"],
    );
    let _c = join(
        model,
        tdirs[2].path(),
        "20..30",
        Some(&tboot),
        &["--max-sessions", "8"],
    );
    wait_for(Duration::from_secs(30), || {
        status_json(&tboot).filter(|v| [0, 15, 25].iter().all(|b| holders(v, *b).len() == 1))
    });
    println!("concurrent asks (3 hops, --max-sessions 8, 32 tokens each)");
    println!("asks  ok  wall s  tokens/s in all  decode tok/s per ask (median)");
    for n in [1usize, 8, 32] {
        let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let t = Instant::now();
        let outs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = dirs
                .iter()
                .map(|d| {
                    let b = &tboot;
                    s.spawn(move || {
                        node_ask(
                            b,
                            d.path(),
                            &["--raw", "--temperature", "0", "--max-tokens", "32"],
                            PROMPT,
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wall = t.elapsed().as_secs_f64();
        let ok = outs.iter().filter(|o| o.status.success()).count();
        let rates: Vec<f64> = outs
            .iter()
            .filter_map(|o| {
                let e = String::from_utf8_lossy(&o.stderr);
                let l = e.lines().find(|l| l.starts_with("stats:"))?.to_string();
                let r = l
                    .split("decode ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok();
                r
            })
            .collect();
        println!(
            "{n:>4}  {ok:>2}  {wall:>6.2}  {:>15.1}  {:>28.1}",
            (ok * 32) as f64 / wall,
            median(rates)
        );
    }
}
