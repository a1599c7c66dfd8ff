#!/usr/bin/env bash
# The main job on one machine: fetch the test model, build, start a local
# 3-node swarm on loopback (layers 0..10, 10..20, 20..30 of SmolLM2-135M),
# ask it one prompt with `nakshatra node ask`, print the chain and the
# answer, and shut the nodes down.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model="$(bash scripts/fetch-test-model.sh)"
cargo build --release --locked -p nakshatra >&2
bin=target/release/nakshatra
prompt="${*:-What is the capital of France?}"

# One core's worth of threads per node: nodes sharing a host must not
# oversubscribe it (llama.cpp's threads spin).
cores=$(nproc)
threads=$(( cores / 3 > 0 ? cores / 3 : 1 ))

source scripts/local-swarm.sh

start_node a 0..10
first=$addr
start_node b 10..20 "$first"
start_node c 20..30 "$first"
echo "swarm of 3 nodes up; bootstrap: $first" >&2

wait_covered "$first"
"$bin" swarm status --no-mdns --bootstrap "$first" >&2

"$bin" --data-dir "$work/asker" node ask --no-mdns --bootstrap "$first" \
  --temperature 0 --max-tokens 64 "$prompt"
