#!/usr/bin/env bash
# The first seconds of a flood and deadlines under overload, measured with a third-party
# load generator (ghz, built here from its Go module) against the release frontend on the
# demo model (docs/benchmarks.md, "Fair from the first second of a flood").
#
#  1. baseline: the legitimate tenant alone, a steady LEGIT_RATE requests/s;
#  2. flood from a standing start: the same load, and FLOOD_AFTER seconds in the attacker
#     starts at ATTACK_RATE requests/s — 50x its 120-a-minute quota, whose bucket (120
#     requests) it spends at once. The legitimate tenant's latency is reported for the
#     first 5 s of the flood and for the rest of it;
#  3. deadlines: open-loop at 3x the closed-loop knee with 1 s deadlines; how each request
#     ended, from ghz's status counts and the frontend's own metrics.
# Tiers as in the issue: `legit` 600 requests/min, `attacker` 120/min, both normal
# priority, weight 1; 25-token prompts (token ids), 16 new tokens; the frontend's defaults
# (32 engine slots, a queue of 64). Output: JSON per run and a summary in $OUT
# (default target/bench-flood/).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
# shellcheck source=../versions.env
source hack/versions.env
out=${OUT:-$repo/target/bench-flood}
seconds=${SECONDS_PER_RUN:-30}
legit_rate=${LEGIT_RATE:-5}
attack_rate=${ATTACK_RATE:-100}
flood_after=${FLOOD_AFTER:-5}
# Which parts to run (comma-separated): flood (1 and 2), deadlines (3).
runs=${RUNS:-flood,deadlines}
mkdir -p "$out"

cache=${SWITCHYARD_CACHE_DIR:-$HOME/.cache/switchyard}
ghz_dir="$cache/tools/ghz-$GHZ_VERSION"
if [[ ! -x $ghz_dir/ghz ]]; then
  echo "==> building ghz $GHZ_VERSION (once; cached in $ghz_dir)"
  mkdir -p "$ghz_dir"
  GOTOOLCHAIN="$GO_TOOLCHAIN" CGO_ENABLED=0 GOFLAGS=-mod=mod GOBIN="$ghz_dir" \
    go install -trimpath -ldflags "-s -w" "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION"
fi
ghz="$ghz_dir/ghz"

echo "==> building the release binaries"
cargo build --quiet --release -p switchyard-worker -p switchyard-cli --bins
bin="$repo/target/release"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d -t switchyard-flood.XXXXXX)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

mkdir -p "$work/keys"
printf 'legit:legit-key-0123456789:legit\nattacker:attacker-key-0123456789:attacker\n' >"$work/keys/tenants"
cat >"$work/admission.json" <<JSON
{"apiKeysDir": "$work/keys", "defaultTier": "legit",
 "tiers": [{"name": "legit", "priority": "normal", "weight": 1, "requestsPerMinute": 600},
           {"name": "attacker", "priority": "normal", "weight": 1, "requestsPerMinute": 120}],
 "maxQueued": 64, "defaultDeadlineSeconds": 30}
JSON
ids=$(python3 -c 'print(",".join(str(100 + 7 * i) for i in range(25)))')
echo "{\"token_ids\": {\"ids\": [$ids]}, \"sampling\": {\"max_tokens\": 16, \"ignore_eos\": true}}" >"$work/body.json"

start_frontend() {
  local port metrics
  port=$(free_port)
  metrics=$(free_port)
  "$bin/switchyard-worker" --role frontend --model demo --admission-config "$work/admission.json" \
    --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics" >"$work/frontend.log" 2>&1 &
  pid=$!
  addr="127.0.0.1:$port"
  metrics_url="http://127.0.0.1:$metrics/metrics"
  for _ in $(seq 300); do
    "$bin/switchyard" --addr "http://$addr" health --service switchyard.v1.Inference >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  cat "$work/frontend.log"
  exit 1
}
stop_frontend() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=""; cp "$work/frontend.log" "$out/frontend.log"; }

# load NAME KEY RATE SECONDS TIMEOUT: ghz at RATE requests/s, every request's result kept.
load() {
  "$ghz" --insecure --proto proto/proto/switchyard/v1/inference.proto --import-paths proto/proto \
    --call switchyard.v1.Inference.Generate --data-file "$work/body.json" \
    --metadata "{\"authorization\": \"Bearer $2\"}" --rps "$3" --concurrency 300 \
    --duration "${4}s" --timeout "$5" --format json --output "$out/$1.json" "$addr"
}

if [[ ,$runs, == *,flood,* ]]; then
echo "==> baseline: legit alone at $legit_rate req/s for ${seconds}s"
start_frontend
load baseline legit-key-0123456789 "$legit_rate" "$seconds" 10s
stop_frontend

echo "==> flood from a standing start: the attacker at $attack_rate req/s from ${flood_after}s in"
start_frontend
load flood-legit legit-key-0123456789 "$legit_rate" "$((seconds + flood_after))" 10s &
legit_pid=$!
sleep "$flood_after"
load flood-attacker attacker-key-0123456789 "$attack_rate" "$seconds" 10s
wait "$legit_pid"
curl -s "$metrics_url" >"$out/flood-metrics.txt"
stop_frontend
fi

if [[ ,$runs, == *,deadlines,* ]]; then
echo "==> the knee (closed loop, 32 in flight) and 3x it with 1 s deadlines"
open='{"tiers": [], "maxQueued": 64, "defaultDeadlineSeconds": 30}'
echo "$open" >"$work/admission.json"
start_frontend
"$bin/switchyard" --addr "http://$addr" bench --concurrency 32 --duration 10s --warmup 2s \
  --prompt-tokens 25 --output-tokens 16 --json --no-progress >"$out/knee.json"
knee=$(python3 -c "import json; print(json.load(open('$out/knee.json'))['total']['requests_per_s'])")
rate=$(python3 -c "print(round(3 * $knee))")
echo "    knee $knee req/s; offering $rate req/s"
load deadlines anonymous "$rate" 20 1s
curl -s "$metrics_url" >"$out/deadlines-metrics.txt"
stop_frontend
fi

python3 hack/bench/flood_report.py "$out" "$flood_after" | tee "$out/summary.txt"
