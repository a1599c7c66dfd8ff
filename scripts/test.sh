#!/usr/bin/env bash
# The project's test command: fetches the test model (once), checks
# formatting and lints, builds in release (llama.cpp is always optimised,
# and one profile means one llama.cpp build) and runs every test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NAKSHATRA_TEST_MODEL="$(bash scripts/fetch-test-model.sh)"
export NAKSHATRA_TEST_MODEL

cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets --locked -- -D warnings
cargo build --release --workspace --locked
cargo test --release --workspace --locked -- "$@"
