//! What the benchmarks that compare a local chain with the whole model
//! share: the chain's start-up, its `stats:` lines, and interleaved
//! rounds (this machine is shared and noisy: the two sides are measured
//! side by side, never one after the other).

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tempfile::TempDir;

use crate::{covered_blocks, nakshatra, status_json, stderr_line, wait_for, Proc};

/// Longest a local chain's nodes take to announce every block.
const COVERAGE_WAIT: Duration = Duration::from_secs(60);

/// Nodes on 127.0.0.1 serving one model in consecutive ranges (the
/// first is the others' bootstrap), and a data directory for askers.
pub struct LocalChain {
    /// The nodes, in chain order; dropping them kills them.
    pub nodes: Vec<Proc>,
    /// The first node's multiaddr.
    pub boot: String,
    /// Asker's data directory (vocabulary cache, identity).
    pub asker: TempDir,
    model: String,
    _dirs: Vec<TempDir>,
}

impl LocalChain {
    /// Starts one `node join` per range in `ranges` (`"0..10"`) serving
    /// `model`, each with `extra` arguments (threads, sessions...) after
    /// loopback and no-mDNS ones, and waits until every one of `blocks`
    /// blocks is announced. Panics (a benchmark's setup failed) otherwise.
    pub fn start(model: &str, ranges: &[&str], blocks: usize, extra: &[&str]) -> LocalChain {
        Self::start_traced(model, ranges, blocks, extra, None)
    }

    /// [`LocalChain::start`], each node writing its step trace to
    /// `trace_dir/hop-<i>.tsv` when `trace_dir` is given.
    pub fn start_traced(
        model: &str,
        ranges: &[&str],
        blocks: usize,
        extra: &[&str],
        trace_dir: Option<&Path>,
    ) -> LocalChain {
        let dirs: Vec<TempDir> = ranges
            .iter()
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect();
        let mut nodes: Vec<Proc> = Vec::new();
        let mut boot = String::new();
        for (i, (dir, layers)) in dirs.iter().zip(ranges).enumerate() {
            let trace = trace_dir.map(|d| d.join(format!("hop-{i}.tsv")));
            let trace = trace.as_ref().and_then(|t| t.to_str());
            let mut a = vec![
                "--model",
                model,
                "--layers",
                layers,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--no-mdns",
            ];
            a.extend_from_slice(extra);
            if let Some(t) = trace {
                a.extend_from_slice(&["--trace-steps", t]);
            }
            if !boot.is_empty() {
                a.extend_from_slice(&["--bootstrap", &boot]);
            }
            let p = Proc::join(dir.path(), &a);
            if boot.is_empty() {
                boot = p.addr().to_string();
            }
            nodes.push(p);
        }
        wait_for(COVERAGE_WAIT, || {
            status_json(&boot).filter(|v| covered_blocks(v).len() == blocks)
        })
        .expect("every block announced");
        LocalChain {
            nodes,
            boot,
            asker: tempfile::tempdir().expect("temp dir"),
            model: model.to_string(),
            _dirs: dirs,
        }
    }

    fn asker_dir(&self) -> &str {
        self.asker.path().to_str().expect("utf-8 temp dir")
    }

    /// `nakshatra run` of the whole model in one process with `threads`
    /// and `args` (then the prompt): its `stats:` line.
    pub fn run_whole(&self, threads: &str, args: &[&str], prompt: &str) -> Option<String> {
        stderr_line(&self.run_whole_output(threads, args, prompt), "stats:")
    }

    /// `nakshatra run` of the whole model in one process with `threads`
    /// and `args` (then the prompt): what it printed.
    pub fn run_whole_output(&self, threads: &str, args: &[&str], prompt: &str) -> Output {
        let mut a = vec![
            "--data-dir",
            self.asker_dir(),
            "run",
            "--model",
            &self.model,
            "--threads",
            threads,
        ];
        a.extend_from_slice(args);
        a.push(prompt);
        nakshatra(&a)
    }

    /// `node ask` through the chain with `args` (then the prompt): its
    /// `stats:` line.
    pub fn ask(&self, args: &[&str], prompt: &str) -> Option<String> {
        stderr_line(&self.ask_output(args, prompt), "stats:")
    }

    /// `node ask` through the chain with `args` (then the prompt): what
    /// it printed.
    pub fn ask_output(&self, args: &[&str], prompt: &str) -> Output {
        let mut a = vec![
            "--data-dir",
            self.asker_dir(),
            "node",
            "ask",
            "--no-mdns",
            "--bootstrap",
            &self.boot,
        ];
        a.extend_from_slice(args);
        a.push(prompt);
        nakshatra(&a)
    }
}

/// One warm-up of each arm (called with `true`), then `rounds` rounds of
/// every arm (called with `false`), the order rotating each round, so
/// that no arm always runs on a machine another just warmed (or heated).
pub fn interleaved(rounds: usize, arms: &mut [&mut dyn FnMut(bool)]) {
    for arm in arms.iter_mut() {
        arm(true);
    }
    let n = arms.len();
    for r in 0..rounds {
        for k in 0..n {
            (arms[(r + k) % n])(false);
        }
    }
}

/// One step at one place, from a step trace (`--trace-steps`): the stage
/// times in the order the line gives them (microseconds since the Unix
/// epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceLine {
    /// `hop` or `ask`.
    pub role: String,
    /// The session.
    pub session: u64,
    /// The step.
    pub step: u64,
    /// Tokens in the step.
    pub n_tokens: u32,
    /// Hop index (0 for the asker).
    pub index: u32,
    /// Stage times: a hop's `in decoded picked computed resumed encoded
    /// sent`, the asker's `start sent token`.
    pub times: Vec<u64>,
}

/// The lines of step trace files that parse (comments and a last line cut
/// short are skipped).
pub fn read_traces(paths: &[std::path::PathBuf]) -> Vec<TraceLine> {
    let mut out = Vec::new();
    for p in paths {
        let Ok(text) = std::fs::read_to_string(p) else {
            continue;
        };
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            let nums: Option<Vec<u64>> = f.iter().skip(1).map(|x| x.parse().ok()).collect();
            let (Some(role), Some(nums)) = (f.first(), nums) else {
                continue;
            };
            let parsed = match (*role, nums.as_slice()) {
                ("hop", [session, step, n, index, times @ ..]) if times.len() == 7 => {
                    (*session, *step, *n, *index, times.to_vec())
                }
                ("ask", [session, step, n, times @ ..]) if times.len() == 3 => {
                    (*session, *step, *n, 0, times.to_vec())
                }
                _ => continue,
            };
            out.push(TraceLine {
                role: role.to_string(),
                session: parsed.0,
                step: parsed.1,
                n_tokens: parsed.2 as u32,
                index: parsed.3 as u32,
                times: parsed.4,
            });
        }
    }
    out
}

/// Where a chain's decode steps spend their time, from the step traces of
/// its asker and hops: per stage, every sample in microseconds.
#[derive(Debug, Default)]
pub struct HopBreakdown {
    /// `(stage name, samples)`, in chain order: the asker's send, then per
    /// hop the link into it and its stages, then the link back.
    pub stages: Vec<(String, Vec<f64>)>,
    /// Per step: (wall time at the asker, engine time of all hops), µs.
    pub steps: Vec<(f64, f64)>,
    /// Hops in the chain.
    pub hops: usize,
}

impl HopBreakdown {
    /// Decode steps (one token, step ≥ 1) seen by the asker and every one
    /// of `hops` hops.
    pub fn of(lines: &[TraceLine], hops: usize) -> HopBreakdown {
        let mut by_step: HashMap<(u64, u64), Vec<&TraceLine>> = HashMap::new();
        for l in lines.iter().filter(|l| l.step >= 1 && l.n_tokens == 1) {
            by_step.entry((l.session, l.step)).or_default().push(l);
        }
        let mut names: Vec<String> = vec!["asker: encode + write".into()];
        for i in 0..hops {
            let into = if i == 0 {
                "link asker → hop 0".to_string()
            } else {
                format!("link hop {} → hop {i}", i - 1)
            };
            names.push(into);
            for s in [
                "decode input",
                "queue to engine",
                "compute",
                "back from engine",
                "encode / sample",
                "write",
            ] {
                names.push(format!("hop {i}: {s}"));
            }
        }
        names.push(format!("link hop {} → asker", hops.saturating_sub(1)));
        let mut stages: Vec<(String, Vec<f64>)> =
            names.into_iter().map(|n| (n, Vec::new())).collect();
        let mut steps = Vec::new();
        let d = |a: u64, b: u64| b as f64 - a as f64;
        for ls in by_step.values() {
            let Some(ask) = ls.iter().find(|l| l.role == "ask") else {
                continue;
            };
            let hop: Vec<Option<&&TraceLine>> = (0..hops as u32)
                .map(|i| ls.iter().find(|l| l.role == "hop" && l.index == i))
                .collect();
            if hop.iter().any(Option::is_none) {
                continue;
            }
            let hop: Vec<&TraceLine> = hop.into_iter().flatten().copied().collect();
            let mut v = vec![d(ask.times[0], ask.times[1])];
            let mut prev_sent = ask.times[1];
            let mut compute = 0.0;
            for h in &hop {
                let t = &h.times;
                v.push(d(prev_sent, t[0]));
                for k in 0..6 {
                    v.push(d(t[k], t[k + 1]));
                }
                compute += d(t[2], t[3]);
                prev_sent = t[6];
            }
            v.push(d(prev_sent, ask.times[2]));
            for (s, x) in stages.iter_mut().zip(v) {
                s.1.push(x);
            }
            steps.push((d(ask.times[0], ask.times[2]), compute));
        }
        HopBreakdown {
            stages,
            steps,
            hops,
        }
    }

    /// [`HopBreakdown::of`] for chains that feed themselves (the ring: the
    /// last hop sends each token to hop 0, the asker sends nothing after
    /// the first step). A step's wall time runs from hop 0 reading it to
    /// hop 0 reading the next; the last hop's stages are its own but for
    /// the sample, which includes writing the token to hop 0, and its
    /// write of the token to the asker, off the step's path; the last
    /// stage is the ring's link back to hop 0.
    /// Only the sessions of the asks among `lines` count (the hops' files
    /// hold every session they served).
    pub fn of_ring(lines: &[TraceLine], hops: usize) -> HopBreakdown {
        let asked: std::collections::HashSet<u64> = lines
            .iter()
            .filter(|l| l.role == "ask")
            .map(|l| l.session)
            .collect();
        let mut by_step: HashMap<(u64, u64), Vec<&TraceLine>> = HashMap::new();
        for l in lines.iter().filter(|l| {
            l.role == "hop" && l.step >= 1 && l.n_tokens == 1 && asked.contains(&l.session)
        }) {
            by_step.entry((l.session, l.step)).or_default().push(l);
        }
        let last = hops.saturating_sub(1);
        let mut names: Vec<String> = Vec::new();
        for i in 0..hops {
            if i > 0 {
                names.push(format!("link hop {} → hop {i}", i - 1));
            }
            let (sample, write) = if i == last {
                ("sample + write to hop 0", "write to the asker (off path)")
            } else {
                ("encode / sample", "write")
            };
            for s in [
                "decode input",
                "queue to engine",
                "compute",
                "back from engine",
                sample,
                write,
            ] {
                names.push(format!("hop {i}: {s}"));
            }
        }
        names.push(format!("link hop {last} → hop 0 (ring)"));
        let mut stages: Vec<(String, Vec<f64>)> =
            names.into_iter().map(|n| (n, Vec::new())).collect();
        let mut steps = Vec::new();
        let d = |a: u64, b: u64| b as f64 - a as f64;
        for (&(session, step), ls) in &by_step {
            let hop: Vec<Option<&&TraceLine>> = (0..hops as u32)
                .map(|i| ls.iter().find(|l| l.index == i))
                .collect();
            let next = by_step
                .get(&(session, step + 1))
                .and_then(|n| n.iter().find(|l| l.index == 0));
            let (Some(next), false) = (next, hop.iter().any(Option::is_none)) else {
                continue;
            };
            let hop: Vec<&TraceLine> = hop.into_iter().flatten().copied().collect();
            let mut v = Vec::new();
            let mut compute = 0.0;
            for (i, h) in hop.iter().enumerate() {
                let t = &h.times;
                if i > 0 {
                    v.push(d(hop[i - 1].times[6], t[0]));
                }
                for k in 0..6 {
                    v.push(d(t[k], t[k + 1]));
                }
                compute += d(t[2], t[3]);
            }
            v.push(d(hop[last].times[5], next.times[0]));
            for (s, x) in stages.iter_mut().zip(v) {
                s.1.push(x);
            }
            steps.push((d(hop[0].times[0], next.times[0]), compute));
        }
        HopBreakdown {
            stages,
            steps,
            hops,
        }
    }

    /// Per-hop overhead of each step (wall time less engine time, over
    /// the hops), µs.
    pub fn overheads(&self) -> Vec<f64> {
        self.steps
            .iter()
            .map(|(wall, compute)| (wall - compute) / self.hops.max(1) as f64)
            .collect()
    }
}

/// The `p`-quantile of `v` (0 ≤ p ≤ 1); NaN for none.
pub fn quantile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}
