//! What the benchmarks that compare a local chain with the whole model
//! share: the chain's start-up, its `stats:` lines, and interleaved
//! rounds (this machine is shared and noisy: the two sides are measured
//! side by side, never one after the other).

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
        let dirs: Vec<TempDir> = ranges
            .iter()
            .map(|_| tempfile::tempdir().expect("temp dir"))
            .collect();
        let mut nodes: Vec<Proc> = Vec::new();
        let mut boot = String::new();
        for (dir, layers) in dirs.iter().zip(ranges) {
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
        stderr_line(&nakshatra(&a), "stats:")
    }

    /// `node ask` through the chain with `args` (then the prompt): its
    /// `stats:` line.
    pub fn ask(&self, args: &[&str], prompt: &str) -> Option<String> {
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
        stderr_line(&nakshatra(&a), "stats:")
    }
}

/// One warm-up of each side, then `rounds` rounds of both, `a` first in
/// even rounds and `b` first in odd ones, so that neither side always
/// runs on a machine the other just warmed (or heated).
pub fn interleaved(rounds: usize, mut a: impl FnMut(bool), mut b: impl FnMut(bool)) {
    a(true);
    b(true);
    for r in 0..rounds {
        if r % 2 == 0 {
            a(false);
            b(false);
        } else {
            b(false);
            a(false);
        }
    }
}
