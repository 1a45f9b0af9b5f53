#!/usr/bin/env bash
# `make bench-llamacpp`: the engine against llama.cpp (built by hack/build-llamacpp.sh from
# the llama-cpp-python sdist) on the same GGUF files, the same machine, the same thread
# count, interleaved: SmolLM2-135M-Instruct as shipped (Q4_1), and requantized by
# llama.cpp's own llama-quantize to Q8_0 and F32. Switchyard loads each file with
# `quantization: auto` (as stored). Prefill tokens/s of a 128-token prompt (llama-bench
# pp128) and decode tokens/s at batch 1, 8, 32 after 128-token prompts
# (llama-batched-bench S_TG); REPS repetitions, medians and ours/theirs ratios. Then the
# same for the MoE bench checkpoint (`make-checkpoint --shape bench`), written as a BF16
# GGUF in F32 and BF16 by hack/bench/bench_to_gguf.py (llama.cpp's converter refuses its
# generated tokenizer) and quantized by llama-quantize to Q8_0 and Q4_K_M: both engines on
# every file, after checking that both give the same greedy tokens for the same prompt ids
# on the F32 file (hack/bench/greedy.c is llama.cpp's side; the other files' agreement is
# reported in greedy.txt). Each step runs under hack/bench/measured.py, which records how
# much CPU other processes took meanwhile (these machines are shared); the summary prints
# the worst share.
#
#   REPS=5 THREADS=2 make bench-llamacpp
#   PARTS=moe make bench-llamacpp        # only the MoE files (PARTS="smollm2 moe" is both)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
reps=${REPS:-5}
parts=${PARTS:-"smollm2 moe"}
threads=${THREADS:-2}
out=${BENCH_OUT:-$repo/target/bench-llamacpp}
mkdir -p "$out"

echo "==> building switchyard-worker (release) and llama.cpp"
cargo build --quiet --release -p switchyard-worker --bin switchyard-worker
worker="$repo/target/release/switchyard-worker"
llama=$(hack/build-llamacpp.sh)
q41=$(hack/fetch-model.sh)
dir=$(dirname "$q41")
for t in Q8_0 F32; do
  f="$dir/SmolLM2-135M-Instruct.$t.gguf"
  [ -s "$f" ] || "$llama/llama-quantize" --allow-requantize "$q41" "$f" "$t" "$threads" >/dev/null 2>&1
done
export RAYON_NUM_THREADS=$threads
# Q8_0/Q4_0/Q4_1 with 8-bit activations, as llama.cpp multiplies them (the engine's default
# keeps f32 activations for those types; INT8_ACTIVATIONS=0 times that instead).
export SWITCHYARD_INT8_ACTIVATIONS=${INT8_ACTIVATIONS:-1}
steps="$out/steps.jsonl"
: >"$steps"
measured() { python3 hack/bench/measured.py "$steps" "$@"; }

# run LABEL FILE DTYPE REP: both engines on one GGUF file.
run() {
  local label=$1 f=$2 dtype=$3 rep=$4
  echo "==> [$rep/$reps] $label: switchyard"
  measured "switchyard $label" -- "$worker" bench --model "$f" --dtype "$dtype" --batch 1,8,32 \
    --prompt-len 128 --decode-len 32 \
    >"$out/switchyard-$label-$rep.json" 2>"$out/switchyard-$label-$rep.log"
  echo "==> [$rep/$reps] $label: llama.cpp"
  measured "llama-bench $label" -- "$llama/llama-bench" -m "$f" -t "$threads" -p 128 -n 0 -r 1 \
    -o json >"$out/llamabench-$label-$rep.json" 2>/dev/null
  measured "llama-batched-bench $label" -- "$llama/llama-batched-bench" -m "$f" -t "$threads" \
    -c 8192 -b 2048 -ub 512 -npp 128 -ntg 32 -npl 1,8,32 >"$out/batched-$label-$rep.txt" 2>&1
}

labels=()
if [[ " $parts " == *" smollm2 "* ]]; then
  labels+=(Q4_1 Q8_0 F32)
  for rep in $(seq "$reps"); do
    for t in Q4_1 Q8_0 F32; do
      run "$t" "$dir/SmolLM2-135M-Instruct.$t.gguf" auto "$rep"
    done
  done
fi

if [[ " $parts " == *" moe "* ]]; then
  moe=$(hack/bench/moe-gguf.sh "$worker" "$llama" "$threads")
  # Both engines' greedy continuation of the same prompt ids on the same files: llama.cpp's
  # through hack/bench/greedy.c, linked against the build tree's static libraries. The F32
  # file must agree token for token (the two compute the same model); the others are
  # reported (rounding differs by design).
  tree=$(dirname "$llama")
  greedy="$out/greedy"
  g++ -O2 -x c hack/bench/greedy.c -x none -I"$tree/src/include" -I"$tree/src/ggml/include" \
    "$tree/build/src/libllama.a" "$tree/build/ggml/src/libggml.a" \
    "$tree/build/ggml/src/libggml-cpu.a" "$tree/build/ggml/src/libggml-base.a" \
    -fopenmp -lpthread -lm -o "$greedy"
  ids=$(python3 -c 'print(",".join(str((i * 7919 + 13) % 32000) for i in range(32)))')
  for t in f32 bf16 q8_0 q4_k_m; do
    f="$moe.$t.gguf"
    ours=$("$worker" greedy --model "$f" --dtype "$([[ $t == bf16 ]] && echo bf16 || echo f32)" \
      --prompt-ids "$ids" --tokens 16 2>/dev/null | python3 -c 'import json, sys; print(",".join(map(str, json.load(sys.stdin)["tokens"])))')
    theirs=$("$greedy" "$f" "$threads" 16 "$ids")
    same=$(python3 -c 'import sys; a, b = sys.argv[1].split(","), sys.argv[2].split(","); print(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)))' "$ours" "$theirs")
    echo "==> greedy, $t: $same of 16 new tokens identical (switchyard $ours; llama.cpp $theirs)" | tee -a "$out/greedy.txt"
    if [[ $t == f32 && $same != 16 ]]; then
      echo "engine-vs-llamacpp: the engines disagree on the F32 file; the comparison is void" >&2
      exit 1
    fi
  done
  labels+=(MoE-F32 MoE-BF16 MoE-Q8_0 MoE-Q4_K_M)
  for rep in $(seq "$reps"); do
    run MoE-F32 "$moe.f32.gguf" f32 "$rep"
    run MoE-BF16 "$moe.bf16.gguf" bf16 "$rep"
    run MoE-Q8_0 "$moe.q8_0.gguf" auto "$rep"
    run MoE-Q4_K_M "$moe.q4_k_m.gguf" auto "$rep"
  done
fi

echo "==> results ($out; $threads threads, medians of $reps)"
python3 - "$out" "$reps" "${labels[@]}" <<'PY'
import json, re, statistics, sys, pathlib
out, reps, labels = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
def ours(t, rep):
    d = json.loads((out / f"switchyard-{t}-{rep}.json").read_text())
    return {(f["phase"], f["batch"]): f["tokens_per_s"] for f in d["figures"]}
def theirs(t, rep):
    r = {}
    for row in json.loads((out / f"llamabench-{t}-{rep}.json").read_text()):
        if row.get("n_prompt") == 128 and row.get("n_gen") == 0:
            r[("prefill", 1)] = row["avg_ts"]
    for line in (out / f"batched-{t}-{rep}.txt").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0] == "128" and cells[1] == "32":
            r[("decode", int(cells[2]))] = float(cells[7])
    return r
print(f"{'file':10} {'phase':8} {'batch':>5} {'switchyard':>11} {'llama.cpp':>10} {'ratio':>6}   per run (ours / theirs)")
for t in labels:
    a = [ours(t, r) for r in range(1, reps + 1)]
    b = [theirs(t, r) for r in range(1, reps + 1)]
    for key in [("prefill", 1), ("decode", 1), ("decode", 8), ("decode", 32)]:
        xs = [x.get(key, float("nan")) for x in a]
        ys = [y.get(key, float("nan")) for y in b]
        mx, my = statistics.median(xs), statistics.median(ys)
        runs = ", ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(xs, ys))
        print(f"{t:10} {key[0]:8} {key[1]:5} {mx:11.1f} {my:10.1f} {mx / my:6.2f}   {runs}")
for t in labels:
    held = json.loads((out / f"switchyard-{t}-1.json").read_text()).get("weights")
    print(f"{t}: switchyard holds {held}")
PY
python3 hack/bench/measured.py --summary "$steps"
