#!/usr/bin/env bash
# `make bench-serving`: Switchyard's frontend against llama.cpp's `llama-server` as servers,
# both through their OpenAI HTTP APIs, on the same GGUF file of the MoE bench checkpoint
# (hack/bench/moe-gguf.sh), the same machine and thread count. The workload: REQUESTS
# requests of PROMPT prompt tokens (random ids, so no prefix is shared) and OUTPUT new
# tokens (ignore_eos), CONCURRENCY in flight (closed loop), measured by `switchyard bench
# --api openai` (streamed POST /v1/completions over HTTP/1.1). Each server is started
# fresh for each run and runs interleaved with the other, REPS repetitions:
#   - Switchyard: `switchyard-worker --role frontend --model FILE`, its defaults (up to 32
#     sequences per step, continuous batching, prefix cache on);
#   - llama.cpp: `llama-server -m FILE -t THREADS -np N -c N*256` (N = the run's
#     concurrency: N slots of 256 tokens, continuous batching, its defaults otherwise).
# Reports output tokens/s, time to first token and inter-token latency (p50, p99), medians
# over the repetitions, and ours/theirs. Each run is wrapped by hack/bench/measured.py
# (the server and the load generator are its own; the share other processes took is
# printed). The load generator shares the 2 cores with the server under test, the same
# for both.
#
#   REPS=3 FILES="q4_k_m f32" CONCURRENCY="1 8 32" make bench-serving
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
bin="$repo/target/release"
threads=${THREADS:-2}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One run (called through measured.py): ENGINE FILE DTYPE CONCURRENCY OUT_JSON.
if [[ "${1:-}" == "--one" ]]; then
  engine=$2 file=$3 dtype=$4 n=$5 json=$6
  port=$(free_port)
  log="${json%.json}.log"
  if [[ $engine == switchyard ]]; then
    RAYON_NUM_THREADS=$threads "$bin/switchyard-worker" --role frontend --model "$file" \
      --dtype "$dtype" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$(free_port)" \
      >"$log" 2>&1 &
  else
    "$LLAMA_BIN/llama-server" -m "$file" -t "$threads" -tb "$threads" -np "$n" \
      -c $((n * 256)) --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
  fi
  pid=$!
  trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true' EXIT
  addr="http://127.0.0.1:$port"
  ready=""
  for _ in $(seq 600); do
    if [[ $engine == switchyard ]]; then
      "$bin/switchyard" --addr "$addr" health --service switchyard.v1.Inference >/dev/null 2>&1 && ready=1
    else
      curl -sf "$addr/health" >/dev/null 2>&1 && ready=1
    fi
    [[ -n $ready ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  [[ -n $ready ]] || { echo "serving-vs-llamacpp: $engine did not start" >&2; cat "$log" >&2; exit 1; }
  "$bin/switchyard" --addr "$addr" bench --api openai --concurrency "$n" \
    --requests "$REQUESTS" --warmup 2s --prompt-tokens "$PROMPT" --output-tokens "$OUTPUT" \
    --vocab-range 1000..8000 --seed "$SEED" --timeout 10m --json --no-progress >"$json"
  exit 0
fi

reps=${REPS:-3}
files=${FILES:-q4_k_m}
concurrency=${CONCURRENCY:-"1 8 32"}
export REQUESTS=${REQUESTS:-64} PROMPT=${PROMPT:-128} OUTPUT=${OUTPUT:-64}
out=${BENCH_OUT:-$repo/target/bench-serving}
mkdir -p "$out"
echo "==> building switchyard (release) and llama.cpp's llama-server"
cargo build --quiet --release -p switchyard-worker -p switchyard-cli --bins
LLAMA_BIN=$(hack/build-llamacpp.sh)
export LLAMA_BIN
moe=$(hack/bench/moe-gguf.sh "$bin/switchyard-worker" "$LLAMA_BIN" "$threads")
steps="$out/steps.jsonl"
: >"$steps"
for rep in $(seq "$reps"); do
  for t in $files; do
    dtype=$([[ $t == bf16 ]] && echo bf16 || echo f32)
    for n in $concurrency; do
      # Both engines get the same prompts within a repetition, new ones in the next.
      export SEED=$rep
      for engine in switchyard llama-server; do
        echo "==> [$rep/$reps] $t, concurrency $n: $engine"
        python3 hack/bench/measured.py "$steps" "$engine $t c$n" -- \
          bash "$repo/hack/bench/serving-vs-llamacpp.sh" --one "$engine" "$moe.$t.gguf" "$dtype" "$n" "$out/$engine-$t-c$n-$rep.json"
      done
    done
  done
done

echo "==> results ($out; $threads threads; $REQUESTS requests of $PROMPT prompt and $OUTPUT new tokens; medians of $reps)"
python3 - "$out" "$reps" "$files" "$concurrency" <<'PY'
import json, pathlib, statistics, sys
out, reps = pathlib.Path(sys.argv[1]), int(sys.argv[2])
files, levels = sys.argv[3].split(), [int(n) for n in sys.argv[4].split()]
def figures(engine, t, n):
    runs = []
    for rep in range(1, reps + 1):
        g = json.loads((out / f"{engine}-{t}-c{n}-{rep}.json").read_text())["total"]
        if g["failed"]:
            print(f"WARNING: {engine} {t} c{n} run {rep}: {g['failed']} failed {g['errors']}")
        runs.append({"tok/s": g["output_tokens_per_s"],
                     "ttft50": g["ttft"]["p50_ms"], "ttft99": g["ttft"]["p99_ms"],
                     "itl50": g["itl"]["p50_ms"], "itl99": g["itl"]["p99_ms"]})
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}, [r["tok/s"] for r in runs]
print("| file | in flight | server | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | tok/s per run |")
print("|---|---:|---|---:|---:|---:|---|")
ratios = []
for t in files:
    for n in levels:
        row = {}
        for engine in ["switchyard", "llama-server"]:
            m, per = figures(engine, t, n)
            row[engine] = m
            print(f"| {t} | {n} | {engine} | {m['tok/s']:.1f} | {m['ttft50']:.0f} / {m['ttft99']:.0f} "
                  f"| {m['itl50']:.1f} / {m['itl99']:.1f} | {', '.join(f'{x:.0f}' for x in per)} |")
        ratios.append((t, n, row["switchyard"]["tok/s"] / row["llama-server"]["tok/s"],
                       row["llama-server"]["ttft50"] / row["switchyard"]["ttft50"]))
for t, n, tok, ttft in ratios:
    print(f"{t} at {n} in flight: output tokens/s ours/theirs {tok:.2f}; TTFT p50 theirs/ours {ttft:.2f}")
PY
python3 hack/bench/measured.py --summary "$steps"
