# Sourced by demo.sh and chain-check.sh: a swarm of `nakshatra node join`
# processes on loopback, stopped (SIGTERM) when the calling script exits.
#
# Needs: $bin (the nakshatra binary), $model (a GGUF), $threads.
# Gives: $work (a temporary dir, removed at exit), start_node,
# wait_covered.

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start_node NAME LAYERS [BOOTSTRAP]: starts a node serving LAYERS of
# $model and sets $addr to its address. Not to be called in a subshell,
# so that its pid stays in $pids for the cleanup.
start_node() {
  local name=$1 layers=$2 boot=${3:-}
  local args=(--data-dir "$work/$name" node join --model "$model" --layers "$layers"
              --listen /ip4/127.0.0.1/tcp/0 --no-mdns --threads "$threads")
  [ -n "$boot" ] && args+=(--bootstrap "$boot")
  "$bin" "${args[@]}" >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 1200); do
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

# wait_covered BOOTSTRAP: waits (up to a minute) until the swarm has no gap.
wait_covered() {
  for _ in $(seq 1 300); do
    if "$bin" swarm status --no-mdns --bootstrap "$1" --json 2>/dev/null \
        | grep -q '"gaps":\[\]'; then
      return 0
    fi
    sleep 0.2
  done
  echo "the swarm did not cover every block" >&2
  return 1
}
