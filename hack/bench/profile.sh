#!/usr/bin/env bash
# Where the engine's time goes in decode: `perf record` (cpu-clock samples, which work in a
# VM without hardware counters) of `switchyard-worker bench`, started once the model has
# loaded, and the share of samples per function. perf comes from Debian's linux-perf
# (hack/install-node-runtime.sh does not install it: `apt-get install linux-perf`).
#
#   hack/bench/profile.sh MODEL DTYPE BATCH [DECODE_LEN] [SKIP_MS]
#
# e.g. hack/bench/profile.sh ~/.cache/switchyard/bench-qwen3-moe-0.5b-v2.bf16.gguf bf16 8
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
model=$1 dtype=$2 batch=$3 decode=${4:-256} skip=${5:-8000}
command -v perf >/dev/null || { echo "profile.sh: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
cargo build --quiet --release -p switchyard-worker --bin switchyard-worker
data=$(mktemp /tmp/switchyard-perf.XXXXXX)
trap 'rm -f "$data"' EXIT
# The prompt is short so that the samples after SKIP_MS are decode steps.
RAYON_NUM_THREADS=${THREADS:-2} perf record -q -F 499 -e cpu-clock -D "$skip" -o "$data" -- \
  target/release/switchyard-worker bench --model "$model" --dtype "$dtype" --batch "$batch" \
  --prompt-len 16 --decode-len "$decode" >/dev/null 2>&1
perf report -i "$data" --no-children --sort symbol --percent-limit 0.5 2>/dev/null \
  | grep -E '^ +[0-9.]+%' | sed -E 's/ +$//' | head -${TOP:-25}
