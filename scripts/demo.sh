#!/usr/bin/env bash
# The main job on one machine: fetch the test model, build, and answer a
# prompt with the model split into three ranges run in one process.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model="$(bash scripts/fetch-test-model.sh)"
cargo build --release --locked -p nakshatra >&2
prompt="${*:-What is the capital of France?}"
exec target/release/nakshatra run --model "$model" --split 10,20 --temperature 0 --max-tokens 64 "$prompt"
