#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds the worker with `--features cuda` (the toolkit
# from hack/check-cuda.sh's wheels, or one already installed), runs the fidelity tests on
# the GPU (every family's logits against transformers, and SmolLM2's GGUF, on cuda:0), then
# a decode benchmark, and prints one table. A few minutes on an H100/H200 once built.
#
#   hack/gpu-check.sh            # CUDA_COMPUTE_CAP=90 by default (hack/versions.env)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export SWITCHYARD_TEST_DEVICE=cuda:0 CUDA_LINK=1

echo "==> build (release, --features cuda)"
hack/check-cuda.sh build --release --bins
worker="$repo/target/cuda/release/switchyard-worker"

echo "==> fidelity tests on cuda:0"
hack/check-cuda.sh test --release --test model_reference --test gguf 2>&1 | tee target/cuda/gpu-tests.log |
  grep -E "^test result|FAILED|panicked"

echo "==> decode benchmark on cuda:0"
smollm2=$(hack/fetch-model.sh)
moe=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bench-qwen3-moe-0.5b-v2
[ -f "$moe/model.safetensors" ] || "$worker" make-checkpoint --shape bench --out "$moe"
runs=(
  "smollm2 f32|$smollm2|f32|none"
  "smollm2 int8|$smollm2|f32|int8"
  "smollm2 as stored (q4_1)|$smollm2|f32|auto"
  "moe-bench bf16|$moe|bf16|none"
  "moe-bench int4|$moe|bf16|int4"
)
for r in "${runs[@]}"; do
  IFS='|' read -r label model dtype q <<<"$r"
  "$worker" bench --device cuda:0 --model "$model" --dtype "$dtype" --quantization "$q" \
    --batch 1,8,32 --prompt-len 128 --decode-len 32 2>/dev/null |
    python3 -c 'import json,sys; d=json.load(sys.stdin); f={(x["phase"],x["batch"]):x["tokens_per_s"] for x in d["figures"]}; print(sys.argv[1], *(f"{f.get(k,0):.0f}" for k in [("prefill",1),("decode",1),("decode",8),("decode",32)]), sep=" | ")' "$label"
done | { echo "model | prefill 128 tok/s | decode b1 | decode b8 | decode b32"; cat; } | column -t -s '|'
