#!/usr/bin/env bash
# The MoE bench checkpoint (`switchyard-worker make-checkpoint --shape bench`) as GGUF files
# beside it in the cache: F32 and BF16 written by hack/bench/bench_to_gguf.py (llama.cpp's
# converter refuses the generated tokenizer), Q8_0 and Q4_K_M quantized from the BF16 file
# by llama.cpp's llama-quantize. Each file is made once; prints the common path prefix P
# (the files are P.f32.gguf, P.bf16.gguf, P.q8_0.gguf, P.q4_k_m.gguf).
#
#   hack/bench/moe-gguf.sh WORKER LLAMA_BIN_DIR [THREADS]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
worker=$1 llama=$2 threads=${3:-2}
cache=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
moe=$cache/bench-qwen3-moe-0.5b-v2
if [ ! -f "$moe/model.safetensors" ]; then
  "$worker" make-checkpoint --shape bench --out "$moe.tmp" >&2 && mv "$moe.tmp" "$moe"
fi
venv=${SWITCHYARD_FIXTURES_VENV:-$cache/venv-fixtures}
for t in f32 bf16; do
  f="$moe.$t.gguf"
  [ -s "$f" ] && continue
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet -r "$repo/hack/fixtures/requirements.txt" >&2
  fi
  "$venv/bin/python" "$repo/hack/bench/bench_to_gguf.py" "$(dirname "$llama")/src" "$moe" "$f" "$t" >&2
done
for t in Q8_0 Q4_K_M; do
  f="$moe.${t,,}.gguf"
  [ -s "$f" ] || "$llama/llama-quantize" "$moe.bf16.gguf" "$f" "$t" "$threads" >/dev/null 2>&1
done
echo "$moe"
