//! Shared helpers for the node's integration tests (real llama.cpp on the
//! real test model).
#![allow(dead_code)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use nakshatra_node::engine::pipeline::{generate, GenerateParams, Generation, LocalChain};
use nakshatra_node::engine::{EngineConfig, SamplerSpec, SliceEngine};

/// The test model: `NAKSHATRA_TEST_MODEL` or the fetch script's cache.
pub fn model() -> PathBuf {
    if let Ok(p) = std::env::var("NAKSHATRA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "test model missing at {}: run scripts/fetch-test-model.sh",
        p.display()
    );
    p
}

/// llama.cpp's threads spin: tests that compute take this lock so they do
/// not oversubscribe the cores.
pub fn heavy() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Engine settings for tests.
pub fn cfg(max_sessions: u32, n_ubatch: u32) -> EngineConfig {
    EngineConfig {
        threads: 2,
        ctx_per_session: 512,
        max_sessions,
        n_ubatch,
        gpu_layers: 0,
    }
}

/// Slices of the test model for the given split points, written into `dir`.
pub fn slices(dir: &Path, cuts: &[u32]) -> Vec<PathBuf> {
    let m = model();
    let ranges: Vec<Range<u32>> = nakshatra_node::layers::split_ranges(cuts, 30).unwrap();
    ranges
        .iter()
        .map(|r| {
            if r.start == 0 && r.end == 30 {
                return m.clone();
            }
            let out = dir.join(format!("{}-{}.gguf", r.start, r.end));
            nakshatra_slicer::write_slice(&m, r.start, r.end, &out).unwrap();
            out
        })
        .collect()
}

/// A chain over the given split points (empty: the whole model).
pub fn chain(dir: &Path, cuts: &[u32], cfg: &EngineConfig) -> LocalChain {
    let stages = slices(dir, cuts)
        .iter()
        .map(|p| SliceEngine::load(p, None, cfg).unwrap())
        .collect();
    LocalChain::new(stages).unwrap()
}

/// Greedy decoding parameters.
pub fn greedy(max_tokens: u32, keep_logits: bool) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampler: SamplerSpec {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        },
        keep_logits,
    }
}

/// Runs one generation in a fresh session and closes it.
pub fn run_once(chain: &mut LocalChain, prompt: &[i32], p: &GenerateParams) -> Generation {
    let s = chain.open().unwrap();
    let g = generate(chain, &s, prompt, p, |_| false, |_| {}).unwrap();
    chain.close(s);
    g
}

/// Largest absolute difference between two logit rows.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}
