#!/usr/bin/env bash
# The project's test command: fetches the test model (once), checks
# formatting and lints, builds in release (llama.cpp is always optimised,
# and one profile means one llama.cpp build) and runs every test.
#
# The tests build the node with the `fault-injection` feature: the e2e
# tests start nodes that misbehave on purpose (`--fault`, a simulated slow
# link). A production build (`cargo build --release -p nakshatra`) has none
# of that code; it is linted here too.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

NAKSHATRA_TEST_MODEL="$(bash scripts/fetch-test-model.sh)"
export NAKSHATRA_TEST_MODEL
# Small real models of other families (Gemma 3 270M), and tiny generated
# ones of every family (scripts/gen-test-models.sh, cached): with
# NAKSHATRA_REAL_MODELS set, a missing real model fails its tests.
bash scripts/fetch-family-models.sh >/dev/null
export NAKSHATRA_REAL_MODELS=1
bash scripts/gen-test-models.sh --cached >/dev/null
features=(--features nakshatra/fault-injection)

# Each step's wall time goes to stderr (where CI's minutes go).
step() {
  local t0=$SECONDS
  "$@"
  echo "test.sh: $(( SECONDS - t0 )) s: $*" >&2
}

step cargo fmt --all -- --check
step cargo clippy --release -p nakshatra -p nakshatra-swarm --all-targets --locked -- -D warnings
step cargo clippy --release --workspace --all-targets --locked "${features[@]}" -- -D warnings
step cargo build --release --workspace --locked "${features[@]}"
# Unit, integration and doc tests. Not the examples (benchmark tools):
# clippy above has checked that they compile, and building each would
# compile the swarm's event loop again (about a minute and a half of CI).
step cargo test --release --workspace --locked "${features[@]}" --lib --bins --tests -- "$@"
step cargo test --release --workspace --locked "${features[@]}" --doc -- "$@"
