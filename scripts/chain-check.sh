#!/usr/bin/env bash
# Checks an already built `nakshatra` on this host's backend (CPU, CUDA,
# Metal...): the whole model in one process against a 3-node swarm on
# loopback holding 0..10, 10..20, 20..N, greedy, same prompt. Prints both
# texts' agreement and the speeds side by side; exits 1 if the texts differ.
#
#   scripts/chain-check.sh [BIN] [MODEL]
#
# BIN defaults to target/release/nakshatra, MODEL to the test model
# (fetched). Env: TOKENS (64), ROUNDS (2), THREADS (cores / 3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin="${1:-target/release/nakshatra}"
model="${2:-$(bash scripts/fetch-test-model.sh)}"
tokens="${TOKENS:-64}"
rounds="${ROUNDS:-2}"
cores=$(nproc)
threads="${THREADS:-$(( cores / 3 > 0 ? cores / 3 : 1 ))}"
prompt="The history of the printing press begins in the fifteenth century, when Johannes Gutenberg of Mainz combined movable metal type, oil-based ink and a wooden screw press. Within fifty years printed books had spread across Europe, and"
n_layers=$("$bin" model inspect "$model" --json | sed -n 's/.*"n_layers": *\([0-9]*\).*/\1/p' | head -n 1)
[ -n "$n_layers" ] || { echo "cannot read the layer count of $model" >&2; exit 2; }

source scripts/local-swarm.sh

stat_of() { # file field -> number before " tok/s" following field
  sed -n "s/.*$2 \([0-9.]*\) tok\/s.*/\1/p" "$1" | tail -n 1
}

echo "== whole model, one process"
for r in $(seq 1 "$rounds"); do
  "$bin" --data-dir "$work/run" run --model "$model" --raw --temperature 0 \
    --max-tokens "$tokens" --threads "$cores" "$prompt" >"$work/whole.txt" 2>"$work/whole.log"
done
grep '^stats:' "$work/whole.log"

start_node a 0..10
first=$addr
start_node b 10..20 "$first"
start_node c "20..$n_layers" "$first"
wait_covered "$first"
echo "== swarm"
"$bin" swarm status --no-mdns --bootstrap "$first"

echo "== 3-node chain, node ask"
for r in $(seq 1 "$rounds"); do
  "$bin" --data-dir "$work/asker" node ask --no-mdns --bootstrap "$first" --raw \
    --temperature 0 --max-tokens "$tokens" "$prompt" >"$work/chain.txt" 2>"$work/chain.log"
done
grep '^chain:\|^stats:' "$work/chain.log" || cat "$work/chain.log"

echo "== text"
cat "$work/whole.txt"
wp=$(stat_of "$work/whole.log" prefill); wd=$(stat_of "$work/whole.log" decode)
cp=$(stat_of "$work/chain.log" prefill); cd_=$(stat_of "$work/chain.log" decode)
echo "speed: prefill whole $wp tok/s, chain $cp tok/s; decode whole $wd tok/s, chain $cd_ tok/s"
awk -v a="$cp" -v b="$wp" -v c="$cd_" -v d="$wd" \
  'BEGIN { if (b > 0 && d > 0) printf "ratio (chain / whole): prefill %.3fx, decode %.3fx\n", a / b, c / d }'
if cmp -s "$work/whole.txt" "$work/chain.txt"; then
  echo "text: identical ($tokens greedy tokens)"
else
  echo "text: DIFFERENT; chain said:"
  cat "$work/chain.txt"
  exit 1
fi
