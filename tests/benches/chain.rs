//! The 3-process chain against the whole model in one process: prefill and
//! decode tokens/s measured side by side (interleaved rounds, medians) and
//! the per-hop overhead (median and p99 over decode steps) of the chain,
//! with the asker sending every step (`--no-ring`) and with the chain
//! feeding itself (the ring, the default: the last hop sends each token
//! to hop 1); the asker-driven chain with f16 hidden states on the wire,
//! and with every link on libp2p streams (`--no-direct`) instead of direct
//! streams; and, from the step
//! traces (`--trace-steps`) of the asker and the three hops, where each
//! microsecond of a decode step goes: per hop, decoding the input, the
//! queue to the engine thread, compute, the way back, encoding (or
//! sampling), writing; and each link between them (noise, TCP and the
//! wake-ups on both ends; yamux and the libp2p connection's task too on
//! libp2p streams), for direct and libp2p links side by side; then the
//! same for the ring's steps, from hop 0 reading one to hop 0 reading the
//! next (`HopBreakdown::of_ring`).
//!
//! `cargo bench -p nakshatra-e2e --bench chain` (after `cargo build
//! --release`). Env: `BENCH_ROUNDS` (5), `BENCH_THREADS` (threads for the
//! whole model and for each node; default 1 — on a shared host the nodes
//! must not oversubscribe the cores), `BENCH_TOKENS` (64).

use nakshatra_e2e::bench::{interleaved, quantile, read_traces, HopBreakdown, LocalChain};
use nakshatra_e2e::*;

fn main() {
    let rounds: usize = env_num("BENCH_ROUNDS", 5);
    let threads: String = env_num("BENCH_THREADS", "1".to_string());
    let tokens: String = env_num("BENCH_TOKENS", "64".to_string());
    let model = test_model();
    let model = model.to_str().expect("utf-8 model path");
    let traces = tempfile::tempdir().expect("temp dir");
    let chain = LocalChain::start_traced(
        model,
        &["0..10", "10..20", "20..30"],
        30,
        &["--threads", &threads],
        Some(traces.path()),
    );
    let prompt = "In the beginning the universe was created. This has made a lot of people very angry and been widely regarded as a bad move. ".repeat(4);
    let common = ["--raw", "--temperature", "0", "--max-tokens", &tokens];
    let (mut wp, mut wd, mut hd) = (vec![], vec![], vec![]);
    let (mut whole_text, mut f16_text) = (None, None);
    // The traced arms send every step from the asker: the breakdown reads
    // each step's way from the asker's send to its token.
    let mut direct = TracedAsks::new("ask", &["--no-ring"]);
    let mut libp2p = TracedAsks::new("ask-libp2p", &["--no-direct", "--no-ring"]);
    let mut ringed = TracedAsks::new("ask-ring", &[]);
    let mut whole = |warm_up: bool| {
        let out = chain.run_whole_output(&threads, &common, &prompt);
        let s = stderr_line(&out, "stats:").expect("run stats");
        whole_text.get_or_insert_with(|| out.stdout.clone());
        if !warm_up {
            wp.push(number_after(&s, "prefill").expect("prefill"));
            wd.push(number_after(&s, "decode").expect("decode"));
        }
    };
    let mut chained = |warm_up: bool| direct.run(&chain, &common, &prompt, traces.path(), warm_up);
    let mut over_libp2p =
        |warm_up: bool| libp2p.run(&chain, &common, &prompt, traces.path(), warm_up);
    let mut ring = |warm_up: bool| ringed.run(&chain, &common, &prompt, traces.path(), warm_up);
    let mut half = |warm_up: bool| {
        let mut args = common.to_vec();
        args.extend_from_slice(&["--wire", "f16", "--no-ring"]);
        let out = chain.ask_output(&args, &prompt);
        let s = stderr_line(&out, "stats:").expect("ask stats");
        f16_text.get_or_insert_with(|| out.stdout.clone());
        if !warm_up {
            hd.push(number_after(&s, "decode").expect("decode"));
        }
    };
    interleaved(
        rounds,
        &mut [
            &mut whole,
            &mut chained,
            &mut ring,
            &mut over_libp2p,
            &mut half,
        ],
    );
    // The hops write their traces at the end of each session.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let hop_files: Vec<_> = (0..3)
        .map(|i| traces.path().join(format!("hop-{i}.tsv")))
        .collect();
    let breakdown_of = |asks: &[std::path::PathBuf]| {
        let mut files = asks.to_vec();
        files.extend(hop_files.iter().cloned());
        HopBreakdown::of(&read_traces(&files), 3)
    };
    let breakdown = breakdown_of(&direct.traces);
    let libp2p_breakdown = breakdown_of(&libp2p.traces);
    let f32_text = direct.text.clone();
    let (wp, wd) = (median(wp), median(wd));
    let (cp, cd) = (
        median(direct.prefill.clone()),
        median(direct.decode.clone()),
    );
    println!("chain bench: SmolLM2-135M Q4_1 | {threads} thread(s) per process | {tokens} tokens | {rounds} interleaved rounds, medians");
    println!("whole (1 process)     prefill {wp:>8.1} tok/s   decode {wd:>7.1} tok/s");
    println!("chain (3 processes)   prefill {cp:>8.1} tok/s   decode {cd:>7.1} tok/s   (--no-ring: every step from the asker)");
    println!("ratio                 prefill {:>8.3}x        decode {:>7.3}x   (targets >= 0.95x, >= 0.90x)", cp / wp, cd / wd);
    println!(
        "hop overhead          median {:.3} ms   p99 {:.3} ms   (target median < 0.15 ms; direct links)",
        median(direct.overhead_median),
        median(direct.overhead_p99)
    );
    assert!(
        ringed.rang.iter().all(|&n| n > 0.0),
        "a chain did not ring: {:?}",
        ringed.rang
    );
    let (rp, rd) = (
        median(ringed.prefill.clone()),
        median(ringed.decode.clone()),
    );
    println!(
        "chain, ring           prefill {rp:>8.1} tok/s   decode {rd:>7.1} tok/s   ratio to whole {:.3}x / {:.3}x, decode {:.3}x of --no-ring   hop overhead median {:.3} ms   p99 {:.3} ms   text {} the whole model's",
        rp / wp,
        rd / wd,
        rd / cd,
        median(ringed.overhead_median.clone()),
        median(ringed.overhead_p99.clone()),
        if ringed.text == whole_text {
            "identical to"
        } else {
            "DIFFERS from"
        }
    );
    println!(
        "chain, libp2p links   decode {:>7.1} tok/s ({:.3}x of direct)   hop overhead median {:.3} ms   p99 {:.3} ms   text {} the direct chain's",
        median(libp2p.decode.clone()),
        median(libp2p.decode) / cd,
        median(libp2p.overhead_median),
        median(libp2p.overhead_p99),
        if libp2p.text == f32_text {
            "identical to"
        } else {
            "DIFFERS from"
        }
    );
    println!(
        "chain, f16 wire       decode {:>7.1} tok/s ({:.3}x of f32)   text {} the f32 chain's",
        median(hd.clone()),
        median(hd) / cd,
        if f16_text == f32_text {
            "identical to"
        } else {
            "differs from"
        }
    );
    println!(
        "exactness             f32 chain text {} the whole model's",
        if f32_text == whole_text {
            "identical to"
        } else {
            "DIFFERS from"
        }
    );
    let (ov, lov) = (breakdown.overheads(), libp2p_breakdown.overheads());
    println!(
        "\nper-step trace: {} + {} decode steps of {rounds} + {rounds} asks; per-hop overhead from the traces: direct median {:.3} ms p99 {:.3} ms, libp2p median {:.3} ms p99 {:.3} ms",
        breakdown.steps.len(),
        libp2p_breakdown.steps.len(),
        quantile(&ov, 0.5) / 1e3,
        quantile(&ov, 0.99) / 1e3,
        quantile(&lov, 0.5) / 1e3,
        quantile(&lov, 0.99) / 1e3
    );
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>10}",
        "stage", "direct p50", "p99", "libp2p p50", "p99"
    );
    for ((name, v), (_, l)) in breakdown.stages.iter().zip(&libp2p_breakdown.stages) {
        println!(
            "{name:<32} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            quantile(v, 0.5),
            quantile(v, 0.99),
            quantile(l, 0.5),
            quantile(l, 0.99)
        );
    }
    // The ring's steps, from hop 0 reading one to hop 0 reading the next.
    let mut files = ringed.traces.clone();
    files.extend(hop_files.iter().cloned());
    let rb = HopBreakdown::of_ring(&read_traces(&files), 3);
    let walls: Vec<f64> = rb.steps.iter().map(|s| s.0).collect();
    let rov = rb.overheads();
    println!(
        "\nring, per-step trace: {} decode steps of {rounds} asks; step p50 {:.3} ms p99 {:.3} ms; per-hop overhead median {:.3} ms p99 {:.3} ms (direct links)",
        rb.steps.len(),
        quantile(&walls, 0.5) / 1e3,
        quantile(&walls, 0.99) / 1e3,
        quantile(&rov, 0.5) / 1e3,
        quantile(&rov, 0.99) / 1e3
    );
    println!("{:<36} {:>10} {:>10}", "stage", "ring p50", "p99");
    for (name, v) in &rb.stages {
        println!(
            "{name:<36} {:>10.1} {:>10.1}",
            quantile(v, 0.5),
            quantile(v, 0.99)
        );
    }
}

/// Traced asks of one kind (`--trace-steps` each, plus `extra` flags) and
/// what their `stats:` lines said.
struct TracedAsks {
    /// Trace file names start with this.
    name: &'static str,
    extra: Vec<&'static str>,
    asks: usize,
    /// The first answer's text.
    text: Option<Vec<u8>>,
    /// The measured (not warm-up) asks' trace files.
    traces: Vec<std::path::PathBuf>,
    prefill: Vec<f64>,
    decode: Vec<f64>,
    overhead_median: Vec<f64>,
    overhead_p99: Vec<f64>,
    /// Decode steps the chain fed itself, per measured ask.
    rang: Vec<f64>,
}

impl TracedAsks {
    fn new(name: &'static str, extra: &[&'static str]) -> Self {
        TracedAsks {
            name,
            extra: extra.to_vec(),
            asks: 0,
            text: None,
            traces: Vec::new(),
            prefill: Vec::new(),
            decode: Vec::new(),
            overhead_median: Vec::new(),
            overhead_p99: Vec::new(),
            rang: Vec::new(),
        }
    }

    /// One ask through `chain`, its trace written under `dir`.
    fn run(
        &mut self,
        chain: &LocalChain,
        common: &[&str],
        prompt: &str,
        dir: &std::path::Path,
        warm_up: bool,
    ) {
        let trace = dir.join(format!("{}-{}.tsv", self.name, self.asks));
        self.asks += 1;
        let t = trace.to_str().expect("utf-8 path").to_string();
        let mut args = common.to_vec();
        args.extend_from_slice(&["--trace-steps", &t]);
        args.extend_from_slice(&self.extra);
        let out = chain.ask_output(&args, prompt);
        let s = stderr_line(&out, "stats:").expect("ask stats");
        self.text.get_or_insert_with(|| out.stdout.clone());
        if !warm_up {
            self.traces.push(trace);
            self.prefill
                .push(number_after(&s, "prefill").expect("prefill"));
            self.decode
                .push(number_after(&s, "decode").expect("decode"));
            self.overhead_median
                .push(number_after(&s, "overhead median").expect("median"));
            self.overhead_p99
                .push(number_after(&s, "p99").expect("p99"));
            self.rang.push(number_after(&s, "ring").unwrap_or(0.0));
        }
    }
}
