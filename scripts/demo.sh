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

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# One core's worth of threads per node: nodes sharing a host must not
# oversubscribe it (llama.cpp's threads spin).
cores=$(nproc)
threads=$(( cores / 3 > 0 ? cores / 3 : 1 ))

# Sets $addr to the node's address. Not called in a subshell, so that its
# pid stays in $pids for the cleanup.
start_node() { # name layers [bootstrap]
  local name=$1 layers=$2 boot=${3:-}
  local args=(--data-dir "$work/$name" node join --model "$model" --layers "$layers"
              --listen /ip4/127.0.0.1/tcp/0 --no-mdns --threads "$threads")
  [ -n "$boot" ] && args+=(--bootstrap "$boot")
  "$bin" "${args[@]}" >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 600); do
    if grep -q '^listening on ' "$work/$name.out" 2>/dev/null; then
      addr=$(sed -n 's/^listening on //p' "$work/$name.out" | head -n 1)
      return 0
    fi
    sleep 0.1
  done
  echo "node $name did not start:" >&2
  cat "$work/$name.log" >&2
  return 1
}

start_node a 0..10
first=$addr
start_node b 10..20 "$first"
start_node c 20..30 "$first"
echo "swarm of 3 nodes up; bootstrap: $first" >&2

# Wait until the swarm covers every block.
for _ in $(seq 1 100); do
  if "$bin" swarm status --no-mdns --bootstrap "$first" --json 2>/dev/null \
      | grep -q '"gaps":\[\]'; then
    break
  fi
  sleep 0.2
done
"$bin" swarm status --no-mdns --bootstrap "$first" >&2

"$bin" --data-dir "$work/asker" node ask --no-mdns --bootstrap "$first" \
  --temperature 0 --max-tokens 64 "$prompt"
