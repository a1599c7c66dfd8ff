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
        device: None,
    }
}

/// Slices of the test model for the given split points, written into `dir`.
pub fn slices(dir: &Path, cuts: &[u32]) -> Vec<PathBuf> {
    slices_of(&model(), dir, cuts)
}

/// Slices of `m` for the given split points, written into `dir`.
pub fn slices_of(m: &Path, dir: &Path, cuts: &[u32]) -> Vec<PathBuf> {
    let n = nakshatra_slicer::model_layers(m).unwrap().n_layers;
    let ranges: Vec<Range<u32>> = nakshatra_node::layers::split_ranges(cuts, n).unwrap();
    let stem = m.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    ranges
        .iter()
        .map(|r| {
            if r.start == 0 && r.end == n {
                return m.to_path_buf();
            }
            let out = dir.join(format!("{stem}-{}-{}.gguf", r.start, r.end));
            nakshatra_slicer::write_slice(m, r.start, r.end, &out).unwrap();
            out
        })
        .collect()
}

/// A chain over the given split points (empty: the whole model).
pub fn chain(dir: &Path, cuts: &[u32], cfg: &EngineConfig) -> LocalChain {
    chain_of(&model(), dir, cuts, cfg)
}

/// A chain of `m` over the given split points (empty: the whole model).
pub fn chain_of(m: &Path, dir: &Path, cuts: &[u32], cfg: &EngineConfig) -> LocalChain {
    let stages = slices_of(m, dir, cuts)
        .iter()
        .map(|p| SliceEngine::load(p, None, cfg).unwrap())
        .collect();
    LocalChain::new(stages).unwrap()
}

/// Tiny random-weight models of every family (`<arch>.gguf`), written once
/// by `scripts/gen-test-models.sh --cached` into
/// `.cache/test-models/<hash of the generator>/` and shared by every test.
pub fn family_models() -> PathBuf {
    static DONE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = done.as_ref() {
        return dir.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let o = std::process::Command::new("bash")
        .arg(root.join("scripts/gen-test-models.sh"))
        .arg("--cached")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "scripts/gen-test-models.sh --cached failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(
        dir.join("complete").exists(),
        "no model set in {}",
        dir.display()
    );
    *done = Some(dir.clone());
    dir
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

/// Where `scripts/fetch-family-models.sh` caches the real models:
/// `NAKSHATRA_MODEL_CACHE`, else `.cache/models` at the repository root.
pub fn real_model_dir() -> PathBuf {
    match std::env::var_os("NAKSHATRA_MODEL_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/models"),
    }
}

/// The real model `file` fetched by `scripts/fetch-family-models.sh NAME`,
/// or `None` (after saying why the test is skipped) when it is absent and
/// `NAKSHATRA_REAL_MODELS` is unset. With that variable set (CI sets it
/// after running the script), an absent model fails the test.
pub fn real_model(name: &str, file: &str) -> Option<PathBuf> {
    let p = real_model_dir().join(file);
    if p.is_file() {
        return Some(p);
    }
    let required = std::env::var_os("NAKSHATRA_REAL_MODELS").is_some_and(|v| !v.is_empty());
    assert!(
        !required,
        "NAKSHATRA_REAL_MODELS is set but the real model {name} is missing at {}: \
         run scripts/fetch-family-models.sh {name}",
        p.display()
    );
    eprintln!(
        "SKIPPED: real model {name} not found at {} (run scripts/fetch-family-models.sh {name}; \
         set NAKSHATRA_REAL_MODELS=1 to make its absence a failure)",
        p.display()
    );
    None
}

/// The text of generated tokens, as a person would read it.
pub fn text_of(tok: &nakshatra_node::engine::tokenizer::Tokenizer, tokens: &[i32]) -> String {
    let mut s = nakshatra_node::engine::tokenizer::Utf8Stream::default();
    let mut out: String = tokens.iter().map(|&t| s.push(&tok.piece(t))).collect();
    out.push_str(&s.finish());
    out
}
