//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub mod qwen2;

/// File name of the test model.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2-135M-Instruct Q4_1 test model: `$NAKSHATRA_TEST_MODEL`, else
/// `<workspace>/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`. Fails the
/// test (never skips it) when the file is missing.
pub fn model_path() -> PathBuf {
    let path = match std::env::var_os("NAKSHATRA_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(".cache/models")
            .join(MODEL_FILE),
    };
    assert!(
        path.is_file(),
        "test model not found at {}: run `scripts/fetch-test-model.sh` from the workspace root \
         (or set NAKSHATRA_TEST_MODEL to the path of {MODEL_FILE})",
        path.display()
    );
    path
}

/// A fresh temporary directory.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}
