#!/usr/bin/env bash
# `make demo`: builds the worker and the CLI, starts a frontend on free loopback ports
# serving the built-in demo model (or MODEL=<checkpoint dir>), streams a completion through
# the `switchyard` CLI, then prints a short summary from the frontend's /metrics: tokens/s
# and which experts the tokens were routed to. Stops the worker on exit, whatever happens.
#
#   make demo                          # the demo model: random weights, meaningless text
#   MODEL=/path/to/checkpoint make demo
#   PROMPT="Write a haiku" MAX_TOKENS=64 make demo
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

model=${MODEL:-demo}
prompt=${PROMPT:-"Once upon a time, in a switchyard full of experts,"}
max_tokens=${MAX_TOKENS:-48}

echo "==> building switchyard-worker and switchyard (release; the first build takes a few minutes)"
cargo build --quiet --release -p switchyard-worker --bins
bin="$repo/target/release"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
log=$(mktemp -t switchyard-demo.XXXXXX.log)
"$bin/switchyard-worker" --role frontend --model "$model" \
  --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" >"$log" 2>&1 &
worker=$!
trap 'kill $worker 2>/dev/null; wait $worker 2>/dev/null; rm -f "$log"' EXIT

addr="http://127.0.0.1:$port"
if [ "$model" = demo ]; then
  echo "==> starting a frontend on $addr with the built-in demo model"
  echo "    (a small Qwen3-MoE-shaped checkpoint with RANDOM weights, generated into"
  echo "     ~/.cache/switchyard on first use: its text is meaningless, the machinery is real)"
else
  echo "==> starting a frontend on $addr with $model"
fi
for _ in $(seq 600); do
  "$bin/switchyard" --addr "$addr" health --service switchyard.v1.Inference >/dev/null 2>&1 && break
  kill -0 $worker 2>/dev/null || { echo "the worker exited:"; cat "$log"; exit 1; }
  sleep 0.2
done
"$bin/switchyard" --addr "$addr" health --service switchyard.v1.Inference >/dev/null ||
  { echo "the frontend did not become ready:"; cat "$log"; exit 1; }
grep -m1 'model loaded' "$log" | sed 's/^.*model loaded /    model loaded: /'

echo "==> switchyard generate --max-tokens $max_tokens \"$prompt\""
echo
"$bin/switchyard" --addr "$addr" generate --max-tokens "$max_tokens" --temperature 0.8 --seed 1 "$prompt"
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
if experts:
    layers = sorted({l for (_, l) in experts})
    print(f"    experts used     : {sum(1 for v in experts.values() if v > 0)} (layer, expert) pairs across {len(layers)} MoE layers")
    for l in layers:
        row = sorted(((v, e) for (e, ll), v in experts.items() if ll == l), reverse=True)
        top = ", ".join(f"#{e}:{v:.0f}" for v, e in row[:6])
        print(f"      layer {l}: {len(row)} experts, busiest {top}")
EOF
