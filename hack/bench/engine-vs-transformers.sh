#!/usr/bin/env bash
# `make bench-engine`: the engine against Python `transformers` on the same generated
# checkpoint (about 0.5 B parameters, OLMoE's proportions: 16 experts, top-4, vocab 32k),
# the same machine, the same run. Prefill tokens/s, decode tokens/s at batch 1, 8, 32, in
# f32 and bf16; our figures also as a fraction of the memory-bandwidth bound.
#
#   BATCH=1,8,32 PROMPT_LEN=128 DECODE_LEN=32 DTYPES="f32 bf16" make bench-engine
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
batch=${BATCH:-1,8,32}
prompt_len=${PROMPT_LEN:-128}
decode_len=${DECODE_LEN:-32}
dtypes=${DTYPES:-"f32 bf16"}
cache=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
ckpt=${BENCH_CHECKPOINT:-$cache/bench-qwen3-moe-0.5b-v2}
venv=${SWITCHYARD_FIXTURES_VENV:-$cache/venv-fixtures}
out=${BENCH_OUT:-$repo/target/bench-engine}
mkdir -p "$out"

echo "==> building switchyard-worker (release)"
cargo build --quiet --release -p switchyard-worker --bin switchyard-worker
worker="$repo/target/release/switchyard-worker"
if [ ! -f "$ckpt/model.safetensors" ]; then
  echo "==> generating the benchmark checkpoint into $ckpt"
  "$worker" make-checkpoint --shape bench --out "$ckpt.tmp"
  mv "$ckpt.tmp" "$ckpt"
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating the Python virtualenv $venv (torch + transformers from PyPI; several GB, once)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r hack/fixtures/requirements.txt
fi

for dtype in $dtypes; do
  echo "==> switchyard, $dtype"
  "$worker" bench --model "$ckpt" --dtype "$dtype" --batch "$batch" \
    --prompt-len "$prompt_len" --decode-len "$decode_len" >"$out/switchyard-$dtype.json"
  echo "==> transformers, $dtype"
  "$venv/bin/python" hack/bench/transformers_bench.py --model "$ckpt" --dtype "$dtype" --batch "$batch" \
    --prompt-len "$prompt_len" --decode-len "$decode_len" >"$out/transformers-$dtype.json"
done

echo "==> results ($out)"
python3 - "$out" $dtypes <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'dtype':6} {'phase':8} {'batch':>5} {'switchyard tok/s':>17} {'transformers tok/s':>19} {'ratio':>6} {'bw bound':>8}")
for dtype in sys.argv[2:]:
    ours = json.loads((out / f"switchyard-{dtype}.json").read_text())
    theirs = json.loads((out / f"transformers-{dtype}.json").read_text())
    ref = {(f["phase"], f["batch"]): f for f in theirs["figures"]}
    for f in ours["figures"]:
        t = ref.get((f["phase"], f["batch"]))
        tt = t["tokens_per_s"] if t else float("nan")
        print(f"{dtype:6} {f['phase']:8} {f['batch']:5} {f['tokens_per_s']:17.1f} {tt:19.1f} "
              f"{f['tokens_per_s'] / tt:6.2f} {100 * f['bandwidth_fraction']:7.0f}%")
print(f"bandwidth bound {ours['bound_bandwidth_gb_s']:.1f} GB/s (copy {ours['copy_bandwidth_gb_s']:.1f}, "
      f"read {ours['read_bandwidth_gb_s']:.1f}); parameters {ours['parameters']:,}; "
      f"transformers {theirs['transformers']}, torch {theirs['torch']}, {theirs['threads']} threads")
PY
