#!/usr/bin/env bash
# The prefix cache and the two APIs on a shared-system-prompt chat workload
# (docs/benchmarks.md), on loopback with the MoE bench checkpoint (`make-checkpoint --shape
# bench`, F32 on the CPU; the load generator shares the machine):
#  1. one request with a new 1,000-token system prompt, then one with the same system
#     prompt and another question: TTFT cold and warm, and the cached prompt tokens;
#  2. the chat workload — REQUESTS requests, CONCURRENCY in flight, each the same system
#     prompt and its own QUESTION-token question, OUTPUT tokens out — with the prefix cache
#     on and off (a fresh frontend each): TTFT p50/p99, computed prompt tokens/s, hit rate;
#  3. the same workload with the cache on through the OpenAI HTTP API (streamed
#     /v1/completions over HTTP/1.1) against gRPC: the per-request overhead of HTTP. (Each
#     run draws new questions: one seen before would come from the cache as well.)
#  4. the protocol's own cost: the demo model, one output token, one request at a time.
# Output: the JSON reports in $OUT (default target/bench-prefix-cache/) and a summary.
#
#   REQUESTS=40 CONCURRENCY=4 hack/bench/prefix-cache.sh
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
out=${OUT:-$repo/target/bench-prefix-cache}
requests=${REQUESTS:-40}
concurrency=${CONCURRENCY:-4}
system=${SYSTEM:-1000}
question=${QUESTION:-32}
output=${OUTPUT:-16}
cache=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
mkdir -p "$out"
echo "==> building (release)"
cargo build --quiet --release -p switchyard-worker -p switchyard-cli --bins
bin="$repo/target/release"
model=$cache/bench-qwen3-moe-0.5b-v2
if [ ! -f "$model/model.safetensors" ]; then
  "$bin/switchyard-worker" make-checkpoint --shape bench --out "$model.tmp" && mv "$model.tmp" "$model"
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d -t switchyard-prefix.XXXXXX)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

# start_frontend PREFIX_CACHE: sets $addr and $pid.
start_frontend() {
  local port
  port=$(free_port)
  "$bin/switchyard-worker" --role frontend --model "$model" --prefix-cache "$1" \
    --max-batch-size 8 --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$(free_port)" \
    >"$work/frontend.log" 2>&1 &
  pid=$!
  addr="http://127.0.0.1:$port"
  for _ in $(seq 600); do
    "$bin/switchyard" --addr "$addr" health --service switchyard.v1.Inference >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  cat "$work/frontend.log"; exit 1
}
stop_frontend() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=""; }
# bench NAME OUTPUT_TOKENS ARGS...: one run into $out/NAME.json.
bench() {
  local name=$1 tokens=$2; shift 2
  echo "==> $name"
  "$bin/switchyard" --addr "$addr" bench --shared-prefix-tokens "$system" --shared-prefix-seed 7 \
    --prompt-tokens "$question" --output-tokens "$tokens" --timeout 10m --json --no-progress \
    "$@" >"$out/$name.json"
}

start_frontend true
bench cold 1 --requests 1 --concurrency 1 --seed 1
bench warm 1 --requests 1 --concurrency 1 --seed 2
bench chat-cache-on "$output" --requests "$requests" --concurrency "$concurrency" --seed 3
# New questions for each run: a question seen before would be served from the cache too.
bench chat-cache-on-grpc "$output" --requests "$requests" --concurrency "$concurrency" --seed 4
bench chat-cache-on-http "$output" --requests "$requests" --concurrency "$concurrency" --seed 5 --api openai
stop_frontend
start_frontend false
bench chat-cache-off "$output" --requests "$requests" --concurrency "$concurrency" --seed 3
stop_frontend

# 4. What the protocol itself costs: the small demo model, a 16-token prompt and one output
# token, one request at a time, interleaved; the end-to-end difference is the overhead.
model=demo
start_frontend true
for run in grpc:31 openai:32 openai:33 grpc:34; do
  api=${run%%:*}; seed=${run##*:}
  echo "==> overhead-$api-$seed"
  "$bin/switchyard" --addr "$addr" bench --api "$api" --seed "$seed" --requests 300 --warmup 2s \
    --concurrency 1 --prompt-tokens 16 --output-tokens 1 --json --no-progress \
    >"$out/overhead-$api-$seed.json"
done
stop_frontend

python3 - "$out" "$system" "$question" "$output" <<'EOF'
import json, sys
out, system, question, output = sys.argv[1], *map(int, sys.argv[2:])
r = {n: json.load(open(f"{out}/{n}.json")) for n in
     ["cold", "warm", "chat-cache-on", "chat-cache-off", "chat-cache-on-http", "chat-cache-on-grpc"]}
t = lambda n, q="p50_ms": r[n]["total"]["ttft"][q]
print(f"1. a {system}-token system prompt + {question}-token question, 1 output token:")
print(f"   cold TTFT {t('cold'):.1f} ms; warm (same system prompt, another question) "
      f"{t('warm'):.1f} ms, {r['warm']['total']['cached_prompt_tokens']} prompt tokens cached: "
      f"{t('cold') / t('warm'):.1f}x faster")
print(f"2. chat workload ({r['chat-cache-on']['total']['requests']} requests, "
      f"{r['chat-cache-on']['concurrency']} in flight, {output} output tokens):")
print("   | prefix cache | TTFT p50 ms | TTFT p99 ms | req/s | computed prompt tok/s | hit rate | tokens charged per request (1/4 rule) |")
for n in ["chat-cache-on", "chat-cache-off"]:
    g = r[n]["total"]
    hit = g["cached_prompt_tokens"] / max(1, g["prompt_tokens"])
    charged = (g["prompt_tokens"] - g["cached_prompt_tokens"] + g["cached_prompt_tokens"] / 4
               + g["output_tokens"]) / max(1, g["ok"])
    print(f"   | {n.split('-')[-1]} | {t(n):.1f} | {t(n, 'p99_ms'):.1f} | {g['requests_per_s']:.2f} | "
          f"{g['computed_prompt_tokens_per_s']:.1f} | {100 * hit:.1f}% | {charged:.0f} |")
print("3. the same workload, prefix cache on, per API:")
print("   | API | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms | req/s | cached |")
for n in ["chat-cache-on-grpc", "chat-cache-on-http"]:
    g = r[n]["total"]
    print(f"   | {r[n]['api']} | {t(n):.1f} | {t(n, 'p99_ms'):.1f} | {g['e2e']['p50_ms']:.1f} | "
          f"{g['e2e']['p99_ms']:.1f} | {g['requests_per_s']:.2f} | "
          f"{g['cached_prompt_tokens']}/{g['prompt_tokens']} |")
print("4. per-request cost of the protocol (demo model, 16-token prompt, 1 output token, 1 in flight):")
print("   | API | run | E2E p50 ms | E2E p99 ms | req/s |")
for run in ["grpc-31", "openai-32", "openai-33", "grpc-34"]:
    g = json.load(open(f"{out}/overhead-{run}.json"))["total"]
    api, seed = run.split("-")
    print(f"   | {api} | {seed} | {g['e2e']['p50_ms']:.2f} | {g['e2e']['p99_ms']:.2f} | {g['requests_per_s']:.1f} |")
EOF
