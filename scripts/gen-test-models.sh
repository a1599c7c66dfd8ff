#!/usr/bin/env bash
# Writes tiny random-weight test models, one GGUF per llama.cpp architecture,
# with scripts/gen-test-models.py (see its docstring for what each holds).
#
#   scripts/gen-test-models.sh OUTDIR [ARCH...]
#   scripts/gen-test-models.sh --cached
#   scripts/gen-test-models.sh --py [gen-test-models.py ARGS...]
#   scripts/gen-test-models.sh --big [gen-big-model.py ARGS...]
#
# The first form writes OUTDIR/<arch>.gguf for each ARCH (all 12 when none is
# given) and prints the paths written, one a line. Same arguments,
# byte-identical files. --cached writes all 12 once into
# <repo>/.cache/test-models/<sha256 of gen-test-models.py, 12 hex>/ (a
# changed generator gets a new set; a `complete` marker says the set is
# whole) and prints that directory: the tests' entry point. --py runs the
# generator itself in the venv (other shapes, shards: see its --help);
# --big runs scripts/gen-big-model.py there (a big Llama-shaped model, 80
# quantized blocks by default: see its --help).
# The first run creates a Python venv with the pinned gguf and numpy under
# ${NAKSHATRA_VENV:-<repo>/.cache/venv-gguf} (needs python3 >= 3.10 with
# venv, e.g. Debian/Ubuntu's python3-venv, and PyPI); later runs reuse it.
# The tokenizer comes from the SmolLM2 test model (scripts/fetch-test-model.sh).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NAKSHATRA_VENV:-$root/.cache/venv-gguf}"

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: $0 OUTDIR [ARCH...]" >&2
  exit 2
fi
mode=write
case "$1" in
  --cached) mode=cached; set -- ;;
  --py) mode=py; shift ;;
  --big) mode=big; shift ;;
  *) outdir="$1"; shift ;;
esac
archs=("$@")
if [ ${#archs[@]} -eq 0 ]; then
  archs=(llama qwen2 qwen3 qwen2moe qwen3moe gemma3 gemma2 phi3 deepseek2 gpt-oss olmo2 mistral3)
fi

# numpy pinned so the random weights (and so the files) never change; 2.2.6
# has wheels for Python 3.10-3.13, 2.3.5 for 3.11-3.14.
reqs='gguf==0.19.0
numpy==2.2.6; python_version < "3.14"
numpy==2.3.5; python_version >= "3.14"'

ensure_venv() {
  local stamp="$venv/.nakshatra-requirements"
  if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$reqs" ]; then
    return 0
  fi
  echo "creating the gguf venv in $venv ..." >&2
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  printf '%s\n' "$reqs" > "$venv/requirements.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$venv/requirements.txt" >&2
  printf '%s' "$reqs" > "$stamp"
}

# several runs at once (parallel tests) must not build the venv together
mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv.lock"
  flock 9
  ensure_venv
  flock -u 9
  exec 9>&-
else
  ensure_venv
fi

gen="$root/scripts/gen-test-models.py"
case "$mode" in
  py)
    exec "$venv/bin/python" "$gen" "$@"
    ;;
  big)
    exec "$venv/bin/python" "$root/scripts/gen-big-model.py" "$@"
    ;;
  cached)
    tag="$(sha256sum "$gen" | cut -c1-12)"
    outdir="$root/.cache/test-models/$tag"
    if [ ! -f "$outdir/complete" ]; then
      tmp="$outdir.tmp-$$"
      rm -rf "$tmp"
      mkdir -p "$tmp"
      "$venv/bin/python" "$gen" --arch "${archs[@]}" --out-dir "$tmp" >/dev/null
      touch "$tmp/complete"
      # another run may have won the race: its set is as good
      mv -T "$tmp" "$outdir" 2>/dev/null || rm -rf "$tmp"
    fi
    echo "$outdir"
    ;;
  write)
    mkdir -p "$outdir"
    # one process for all archs: reading the tokenizer costs seconds, once
    exec "$venv/bin/python" "$gen" --arch "${archs[@]}" --out-dir "$outdir"
    ;;
esac
