//! Helpers for end-to-end tests that start real `nakshatra` processes.
//!
//! The tests run the release binary the README's test command builds
//! (`target/release/nakshatra`), or the one named by `NAKSHATRA_BIN`.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};

/// The `nakshatra` binary under test.
pub fn nakshatra_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NAKSHATRA_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("release/nakshatra");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --release -p nakshatra)",
        p.display()
    );
    p
}

/// The test model: `NAKSHATRA_TEST_MODEL` or the fetch script's cache.
pub fn test_model() -> PathBuf {
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
