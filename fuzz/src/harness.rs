//! The fuzz loop ([`fuzz`]) and the per-input check ([`check`]): no panic,
//! and no allocation beyond the decoder's cap.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use nakshatra_swarm::protocol::DECODE_LIMIT;

use crate::alloc::{installed, measure, Usage};

/// Environment variable: seconds each fuzz target runs (a decimal number).
pub const BUDGET_VAR: &str = "NAKSHATRA_FUZZ_SECS";

/// Seconds each target runs when [`BUDGET_VAR`] is not set: short enough
/// for CI (the whole crate in about a minute on 2 cores), long enough for
/// tens of thousands of inputs per target.
pub const DEFAULT_BUDGET_SECS: f64 = 5.0;

/// The time budget of one target: [`BUDGET_VAR`], else
/// [`DEFAULT_BUDGET_SECS`].
pub fn budget() -> Duration {
    let secs = std::env::var(BUDGET_VAR)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(DEFAULT_BUDGET_SECS);
    Duration::from_secs_f64(secs)
}

/// What a decode call may allocate on its thread: the largest single
/// allocation and the peak of live bytes, both inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Largest single allocation allowed, bytes.
    pub largest: usize,
    /// Largest peak of live bytes allowed, bytes.
    pub peak: usize,
}

impl Cap {
    /// The same bound for the largest allocation and the peak.
    pub const fn both(bytes: usize) -> Cap {
        Cap {
            largest: bytes,
            peak: bytes,
        }
    }

    /// `self` plus `bytes` on both bounds.
    pub const fn plus(self, bytes: usize) -> Cap {
        Cap {
            largest: self.largest.saturating_add(bytes),
            peak: self.peak.saturating_add(bytes),
        }
    }
}

/// What one `nakshatra_protocol::decode` may allocate, whatever the
/// length prefixes in its input say: bincode counts every decoded
/// integer and byte against [`DECODE_LIMIT`] before allocating for it,
/// and serde preallocates at most 1 MiB for a sequence, which then grows
/// by doubling as elements really arrive; the worst element (an empty
/// string: 24 bytes in memory, 8 bytes claimed) makes a list of at most
/// 3 × the limit, in a buffer of 4 × (`decode_worst_cases` in
/// `tests/wire.rs` reaches 4,194,240 bytes).
pub const DECODE_CAP: Cap = Cap {
    largest: 4 * DECODE_LIMIT,
    peak: 8 * DECODE_LIMIT,
};

/// Slack added to every cap: bookkeeping that is not the decoder's own
/// (the panic machinery, an executor's waker, error messages).
pub const SLACK: usize = 64 * 1024;

/// Lower-case hex of `bytes` (the form failing inputs are reported in,
/// and regression inputs kept in).
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Bytes from [`hex`] (whitespace ignored). Panics on anything else: it
/// reads the regression inputs written in the tests.
pub fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert!(digits.len().is_multiple_of(2), "odd number of hex digits");
    digits
        .chunks(2)
        .map(|p| {
            let s = std::str::from_utf8(p).expect("hex is ASCII");
            u8::from_str_radix(s, 16).expect("hex digit")
        })
        .collect()
}

/// Runs `decode` (which reads `input`) in a counting window: a panic, or
/// an allocation over `cap` (plus [`SLACK`]), fails the test with the
/// target's name, the input in hex and `context` (what else shaped the
/// call: a limit, a stream's chunking). Returns what `decode` returned
/// and what it allocated.
pub fn check<R>(
    target: &str,
    input: &[u8],
    cap: Cap,
    context: impl FnOnce() -> String,
    decode: impl FnOnce() -> R,
) -> (R, Usage) {
    let (r, usage) = measure(input, decode);
    let cap = cap.plus(SLACK);
    match r {
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!(
                "{target}: the decoder panicked ({why})\n  context: {}\n  input ({} bytes): {}",
                context(),
                input.len(),
                hex(input)
            );
        }
        Ok(r) => {
            if usage.largest > cap.largest || usage.peak > cap.peak {
                panic!(
                    "{target}: allocated beyond its cap: largest {} (cap {}), peak {} (cap {})\n  \
                     context: {}\n  input ({} bytes): {}",
                    usage.largest,
                    cap.largest,
                    usage.peak,
                    cap.peak,
                    context(),
                    input.len(),
                    hex(input)
                );
            }
            (r, usage)
        }
    }
}

/// Per-target statistics, printed when the target ends (`--nocapture`
/// shows them).
#[derive(Debug, Default)]
pub struct Stats {
    /// Inputs decoded.
    pub runs: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Largest single allocation seen, bytes.
    pub largest: usize,
    /// Largest peak of live bytes seen, bytes.
    pub peak: usize,
}

impl Stats {
    /// Counts one decode: whether it was accepted and what it allocated.
    pub fn record(&mut self, accepted: bool, usage: Usage) {
        self.runs += 1;
        self.accepted += u64::from(accepted);
        self.largest = self.largest.max(usage.largest);
        self.peak = self.peak.max(usage.peak);
    }
}

/// Fuzzes one target for [`budget`]: `property` gets random bytes from
/// `arbtest` (sizes growing up to `size_max`), builds an input from them
/// (a mutated valid encoding or plain bytes) and [`check`]s the decoder
/// on it, recording into the [`Stats`] it is handed. A failure prints
/// the arbtest seed too; `ARBTEST_SEED=0x... cargo test ...` replays it.
pub fn fuzz(
    target: &str,
    size_max: u32,
    mut property: impl FnMut(&mut Unstructured<'_>, &mut Stats) -> arbitrary::Result<()>,
) {
    assert!(
        installed(),
        "the counting allocator is not installed: add \
         `#[global_allocator] static ALLOC: nakshatra_fuzz::CountingAlloc = \
         nakshatra_fuzz::CountingAlloc;` to the test binary"
    );
    let t0 = Instant::now();
    let mut stats = Stats::default();
    arbtest::arbtest(|u| property(u, &mut stats))
        .budget(budget())
        .size_min(16)
        .size_max(size_max)
        .run();
    eprintln!(
        "fuzz {target}: {} inputs ({} accepted) in {:.1?}; largest allocation {} B, peak {} B",
        stats.runs,
        stats.accepted,
        t0.elapsed(),
        stats.largest,
        stats.peak
    );
    assert!(stats.runs > 0, "{target}: no input was decoded");
}
