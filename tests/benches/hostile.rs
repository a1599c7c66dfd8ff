//! A serving node under attack against the same node at peace, and the
//! cost of `node ask --verify`, measured side by side in one run:
//!
//! 1. **Memory.** One victim serves the whole test model (`0..30`,
//!    `--max-sessions` `BENCH_ASKS`, `--ctx-size 512`, one thread). Its
//!    resident memory idle (after a warm-up ask); its peak while an
//!    attacker (a libp2p peer in this process) holds 64 streams of each of
//!    the four stream protocols (activation, vocabulary, manifest, piece),
//!    each announcing a 255 MiB payload, for `BENCH_HOLD_SECS`; then its
//!    peak while `BENCH_ASKS` honest `node ask` processes (each its own
//!    identity, with the warm-up asker's vocabulary and manifest already
//!    cached) run at once. Each phase's peak is the larger of `VmHWM`,
//!    reset at the phase's start (`/proc/<pid>/clear_refs`), and `VmRSS`
//!    sampled every 20 ms; where the kernel refuses the reset, `VmHWM` is
//!    the process's lifetime peak and the output says so (the flood runs
//!    first, so its peak is never the asks').
//! 2. **Latency.** Wall time of one honest `node ask` (fixed prompt,
//!    `BENCH_ASK_TOKENS`) on the same victim with no attacker, and while
//!    the attacker floods it continuously (64 streams of each protocol at
//!    all times, each replaced as soon as the victim closes it):
//!    interleaved rounds, medians, ratio; the answers must be identical.
//! 3. **`--verify`.** A swarm where every hop has a replica (two nodes
//!    serve 0..15, two 15..30): decode tok/s from `node ask`'s `stats:`
//!    line without `--verify`, with `--verify 0.1` and with `--verify 1`
//!    (`BENCH_TOKENS` tokens, a 53-token prompt), interleaved rounds,
//!    medians, ratios. The swarm is honest, so an ask that fails
//!    verification is a false alarm: it is counted, printed, and asked
//!    again (up to three times a round).
//!
//! The attacker, the victim, the askers and the replicas share this host's
//! cores: on a small host part of the latency under attack is the
//! attacker's own CPU (its share is printed), and part of the cost of
//! `--verify` is the replica chain computing on the same cores as the
//! chain it checks.
//!
//! `cargo bench -p nakshatra-e2e --bench hostile` (after `cargo build
//! --release`). Env: `BENCH_ROUNDS` (3), `BENCH_ASKS` (32),
//! `BENCH_HOLD_SECS` (3), `BENCH_ASK_TOKENS` (16: the latency asks and the
//! concurrent asks), `BENCH_TOKENS` (64: the `--verify` decode rates).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use nakshatra_e2e::attack::{
    closed_by_victim, flood, lying_frames, peer, FloodCount, Flooder, FLOOD,
};
use nakshatra_e2e::*;
use nakshatra_swarm::PeerId;

const PROMPT: &str = "The capital of France is";

fn env_or(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn check(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Copies an asker's data dir (its cached vocabulary and manifest) into a
/// fresh one, without its identity or its memory of peers.
fn seed_asker(from: &Path, to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dest = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &dest);
            } else {
                std::fs::copy(e.path(), dest).unwrap();
            }
        }
    }
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if name == "identity.key" || name == "peers.json" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy(&e.path(), &to.join(&name));
        } else {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

/// CPU seconds (user + system) process `pid` has used (`self` for this
/// one).
fn cpu_secs(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = s
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; `fields` starts at field 3.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A phase's peak resident memory, KiB.
struct Peak {
    /// The largest `VmRSS` sampled.
    sampled: u64,
    /// `VmHWM` at the end.
    hwm: u64,
}

impl Peak {
    fn kib(&self) -> u64 {
        self.sampled.max(self.hwm)
    }
}

/// Samples `node`'s memory every 20 ms until `done`.
fn watch(node: &Proc, mut done: impl FnMut() -> bool) -> Peak {
    let mut sampled = 0;
    loop {
        let finished = done();
        let (rss, hwm) = node.memory_kib().expect("the victim died");
        sampled = sampled.max(rss);
        if finished {
            return Peak { sampled, hwm };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Settles, then resets `node`'s peak: whether the reset took.
fn start_phase(node: &Proc) -> bool {
    std::thread::sleep(Duration::from_secs(1));
    node.reset_peak_memory()
}

fn main() {
    let rounds: usize = env_num("BENCH_ROUNDS", 3).max(1);
    let asks: usize = env_num("BENCH_ASKS", 32).max(1);
    let hold = Duration::from_secs(env_num("BENCH_HOLD_SECS", 3));
    let ask_tokens = env_or("BENCH_ASK_TOKENS", "16");
    let tokens = env_or("BENCH_TOKENS", "64");
    let max_sessions = asks.max(2).to_string();
    let model = test_model();
    let model = model.to_str().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let greedy = |n: &str| -> Vec<String> {
        ["--raw", "--temperature", "0", "--max-tokens", n]
            .map(String::from)
            .to_vec()
    };
    let ask = |boot: &str, dir: &Path, extra: &[String], prompt: &str| -> (Output, f64) {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let t = Instant::now();
        let o = node_ask(boot, dir, &extra, prompt);
        (o, t.elapsed().as_secs_f64())
    };

    // 1. Memory: idle, under the flood, under honest load; one victim.
    let vdir = tempfile::tempdir().unwrap();
    let mut args = loopback_args(None);
    args.extend_from_slice(&["--model", model, "--layers", "0..30"]);
    args.extend_from_slice(&["--max-sessions", &max_sessions, "--ctx-size", "512"]);
    let victim_node = Proc::join(vdir.path(), &args);
    let boot = victim_node.addr().to_string();
    let victim: PeerId = victim_node.peer_id().parse().unwrap();
    let warm = tempfile::tempdir().unwrap();
    let (o, _) = ask(&boot, warm.path(), &greedy(&ask_tokens), PROMPT);
    check(&o, "the warm-up ask");
    let want = String::from_utf8_lossy(&o.stdout).into_owned();

    let reset = start_phase(&victim_node);
    let (idle, _) = victim_node.memory_kib().unwrap();
    let (attacker, _task) = rt.block_on(peer(&boot, false));
    let a = attacker.clone();
    let attack = rt.spawn(async move {
        let (mut opened, mut closed, mut held) = (0, 0, Vec::new());
        for (protocol, frame) in lying_frames() {
            let mut streams = flood(&a, victim, protocol, &frame).await;
            closed += closed_by_victim(&mut streams, Duration::from_secs(3)).await;
            opened += streams.len();
            held.extend(streams);
        }
        tokio::time::sleep(hold).await;
        drop(held);
        (opened, closed)
    });
    let flood_peak = watch(&victim_node, || attack.is_finished());
    let (opened, closed) = rt.block_on(attack).unwrap();

    let reset = start_phase(&victim_node) && reset;
    let dirs: Vec<_> = (0..asks).map(|_| tempfile::tempdir().unwrap()).collect();
    for d in &dirs {
        seed_asker(warm.path(), d.path());
    }
    let t = Instant::now();
    let (load_peak, load) = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|d| {
                let (boot, args) = (&boot, greedy(&ask_tokens));
                s.spawn(move || ask(boot, d.path(), &args, PROMPT))
            })
            .collect();
        let peak = watch(&victim_node, || handles.iter().all(|h| h.is_finished()));
        let done: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (peak, done)
    });
    let load_wall = t.elapsed().as_secs_f64();
    let load_ok = load
        .iter()
        .filter(|(o, _)| o.status.success() && String::from_utf8_lossy(&o.stdout) == want)
        .count();
    if let Some((o, _)) = load.iter().find(|(o, _)| !o.status.success()) {
        eprintln!(
            "a concurrent ask failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let load_median = median(load.iter().map(|(_, s)| *s).collect());

    // 2. Honest latency with and without an attacker, interleaved.
    let lat = tempfile::tempdir().unwrap();
    seed_asker(warm.path(), lat.path());
    let o = ask(&boot, lat.path(), &greedy(&ask_tokens), PROMPT).0;
    if !o.status.success() {
        let e = victim_node.stderr();
        eprintln!("VICTIM: {}", &e[e.len().saturating_sub(3000)..]);
        let st = std::process::Command::new(nakshatra_bin())
            .args([
                "swarm",
                "status",
                "--no-mdns",
                "--json",
                "--bootstrap",
                &boot,
            ])
            .output()
            .unwrap();
        eprintln!("STATUS: {}", String::from_utf8_lossy(&st.stdout));
    }
    check(&o, "warm-up");
    let vpid = victim_node.pid().to_string();
    // Per ask: wall s, setup s, decode tok/s, victim CPU, this process's CPU.
    let (mut quiet, mut attacked): (Vec<[f64; 5]>, Vec<[f64; 5]>) = (vec![], vec![]);
    let (mut flood_rate, mut flood_total) = (vec![], FloodCount::default());
    for r in 0..rounds {
        for under_attack in [r % 2 == 1, r % 2 == 0] {
            std::thread::sleep(Duration::from_millis(500));
            let flooder = under_attack.then(|| {
                let _in = rt.enter();
                (Flooder::start(&attacker, victim), Instant::now())
            });
            if flooder.is_some() {
                // Let the flood reach its full rate first.
                std::thread::sleep(Duration::from_secs(1));
            }
            let (v0, me0, t0) = (cpu_secs(&vpid), cpu_secs("self"), Instant::now());
            let (o, secs) = ask(&boot, lat.path(), &greedy(&ask_tokens), PROMPT);
            let wall = t0.elapsed().as_secs_f64();
            let victim_cpu = (cpu_secs(&vpid) - v0) / wall;
            let self_cpu = (cpu_secs("self") - me0) / wall;
            check(&o, "a latency ask");
            assert_eq!(
                String::from_utf8_lossy(&o.stdout),
                want,
                "the answer changed"
            );
            let stats = stderr_line(&o, "stats:").expect("a stats line");
            let setup = number_after(&stats, "setup").expect("setup");
            let decode = number_after(&stats, "decode").expect("decode");
            let m = [secs, setup, decode, victim_cpu, self_cpu];
            match flooder {
                Some((f, started)) => {
                    let c = rt.block_on(f.stop());
                    flood_rate.push(c.opened as f64 / started.elapsed().as_secs_f64());
                    flood_total.opened += c.opened;
                    flood_total.closed += c.closed;
                    flood_total.hung += c.hung;
                    flood_total.refused += c.refused;
                    attacked.push(m);
                }
                None => quiet.push(m),
            }
        }
    }
    drop(victim_node);

    // 3. The cost of --verify: every hop has a replica.
    let sdirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let join = |i: usize, layers: &str, b: Option<&str>| {
        let mut a = loopback_args(b);
        a.extend_from_slice(&["--model", model, "--layers", layers]);
        a.extend_from_slice(&["--max-sessions", "4", "--ctx-size", "512"]);
        Proc::join(sdirs[i].path(), &a)
    };
    let first = join(0, "0..15", None);
    let sboot = first.addr().to_string();
    let _swarm = [
        join(1, "0..15", Some(&sboot)),
        join(2, "15..30", Some(&sboot)),
        join(3, "15..30", Some(&sboot)),
    ];
    wait_for(Duration::from_secs(60), || {
        status_json(&sboot).filter(|v| holders(v, 0).len() == 2 && holders(v, 29).len() == 2)
    })
    .expect("the verify swarm never formed");
    let vprompt = "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move. ".repeat(2);
    let vasker = tempfile::tempdir().unwrap();
    let modes: [(&str, Option<&str>); 3] = [
        ("no --verify", None),
        ("--verify 0.1", Some("0.1")),
        ("--verify 1", Some("1")),
    ];
    let prompt_tokens = std::cell::Cell::new(f64::NAN);
    let run_mode = |m: Option<&str>| {
        let mut extra = greedy(&tokens);
        if let Some(rate) = m {
            extra.extend(["--verify".to_string(), rate.to_string()]);
        }
        let (o, secs) = ask(&sboot, vasker.path(), &extra, &vprompt);
        if !o.status.success() && stderr_line(&o, "error: verification failed").is_some() {
            // The swarm is honest: a mismatch is a false alarm.
            return Err(stderr_line(&o, "error:").unwrap_or_default());
        }
        check(&o, "a --verify ask");
        let stats = stderr_line(&o, "stats:").expect("a stats line");
        let checked = stderr_line(&o, "verify:").and_then(|l| number_after(&l, "verify:"));
        prompt_tokens.set(number_after(&stats, "prompt").unwrap_or(f64::NAN));
        Ok((
            number_after(&stats, "decode").expect("decode"),
            secs,
            checked,
        ))
    };
    // Warm-up: vocabulary, manifest, the replica.
    let _ = run_mode(Some("1"));
    let mut decode = vec![vec![]; 3];
    let mut walls = vec![vec![]; 3];
    let mut checked = vec![vec![]; 3];
    // False alarms per mode: (asks that failed verification, asks).
    let mut alarms = [(0, 0); 3];
    for r in 0..rounds {
        for k in 0..3 {
            let i = (k + r) % 3;
            // A false alarm has no stats line: ask again (up to 3 times).
            for _ in 0..3 {
                alarms[i].1 += 1;
                match run_mode(modes[i].1) {
                    Ok((d, s, c)) => {
                        decode[i].push(d);
                        walls[i].push(s);
                        checked[i].extend(c);
                        break;
                    }
                    Err(e) => {
                        eprintln!("{}: {e}", modes[i].0);
                        alarms[i].0 += 1;
                    }
                }
            }
        }
    }

    let kib = |k: u64| format!("{k} KiB");
    println!(
        "hostile bench: SmolLM2-135M Q4_1 | 1 thread per node | {rounds} interleaved rounds, medians | {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "victim: one node serving 0..30, --max-sessions {max_sessions} --ctx-size 512; {}",
        if reset {
            "each peak is its phase's own (VmHWM reset at the phase's start, and VmRSS sampled every 20 ms)"
        } else {
            "VmHWM could not be reset: peaks are VmRSS sampled every 20 ms and the lifetime VmHWM (flood measured before the asks)"
        }
    );
    println!("{:<44} {:>14} {:>9}   notes", "measure", "value", "ratio");
    let row = |what: &str, value: String, ratio: f64, note: String| {
        println!("{what:<44} {value:>14} {ratio:>8.3}x   {note}");
    };
    row(
        "RSS idle (after a warm-up ask)",
        kib(idle),
        1.0,
        String::new(),
    );
    row(
        &format!("RSS peak, flood {FLOOD} streams x 4 protocols"),
        kib(flood_peak.kib()),
        flood_peak.kib() as f64 / idle as f64,
        format!(
            "{opened} streams announcing 255 MiB each, {closed} closed by the victim within 3 s, kept open by the attacker {} s (VmHWM {}, sampled {})",
            hold.as_secs(),
            flood_peak.hwm,
            flood_peak.sampled
        ),
    );
    row(
        &format!("RSS peak, {asks} honest concurrent asks"),
        kib(load_peak.kib()),
        load_peak.kib() as f64 / idle as f64,
        format!(
            "{load_ok}/{asks} right answers, {ask_tokens} tokens each, all done in {load_wall:.1} s, median ask {load_median:.2} s (VmHWM {}, sampled {})",
            load_peak.hwm, load_peak.sampled
        ),
    );
    let col = |v: &[[f64; 5]], k: usize| median(v.iter().map(|m| m[k]).collect());
    let (q, a) = (col(&quiet, 0), col(&attacked, 0));
    row(
        "honest ask latency, no attacker",
        format!("{q:.3} s"),
        1.0,
        format!(
            "{ask_tokens} tokens, same answer; setup {:.2} s, decode {:.1} tok/s; victim CPU {:.0}% of a core, this process {:.0}%",
            col(&quiet, 1),
            col(&quiet, 2),
            100.0 * col(&quiet, 3),
            100.0 * col(&quiet, 4)
        ),
    );
    row(
        "honest ask latency, under continuous flood",
        format!("{a:.3} s"),
        a / q,
        format!(
            "same answer; setup {:.2} s, decode {:.1} tok/s; victim CPU {:.0}%, attacker (this process) {:.0}%; {:.0} streams/s opened, {} of {} closed by the victim, {} left open {} s, {} refused at open",
            col(&attacked, 1),
            col(&attacked, 2),
            100.0 * col(&attacked, 3),
            100.0 * col(&attacked, 4),
            median(flood_rate),
            flood_total.closed,
            flood_total.opened,
            flood_total.hung,
            Flooder::PATIENCE.as_secs(),
            flood_total.refused,
        ),
    );
    println!(
        "--verify swarm: two nodes serve 0..15, two 15..30 (every hop has a replica); prompt {} tokens",
        prompt_tokens.get()
    );
    let base = median(decode[0].clone());
    let base_wall = median(walls[0].clone());
    for (i, (name, _)) in modes.iter().enumerate() {
        let d = median(decode[i].clone());
        let w = median(walls[i].clone());
        let mut note = format!("{tokens} tokens, ask {w:.2} s ({:.3}x)", w / base_wall);
        if !checked[i].is_empty() {
            note += &format!("; {:.0} steps checked", median(checked[i].clone()));
        }
        if i > 0 {
            note += &format!(
                "; FALSE ALARMS (verification failed, honest swarm): {} of {} asks",
                alarms[i].0, alarms[i].1
            );
        }
        row(
            &format!("decode, 2 hops, {name}"),
            format!("{d:.1} tok/s"),
            d / base,
            note,
        );
    }
    let list = |v: Vec<f64>, digits: usize| -> String {
        v.iter()
            .map(|x| format!("{x:.digits$}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "the attacker, victim, askers and replicas share this host's cores: the flood's latency includes the attacker's CPU, --verify's the replica's"
    );
    println!("per round:");
    println!(
        "  ask s, no attacker: {} | under flood: {}",
        list(quiet.iter().map(|m| m[0]).collect(), 3),
        list(attacked.iter().map(|m| m[0]).collect(), 3)
    );
    for (i, (name, _)) in modes.iter().enumerate() {
        println!("  decode tok/s, {name}: {}", list(decode[i].clone(), 1));
    }
}
