#!/usr/bin/env bash
# Admission benchmarks (docs/benchmarks.md), on loopback with the demo model (the load
# generator runs on the same machine and takes its share of the CPU):
#  1. the throughput knee: closed loop at the batch size;
#  2. goodput (requests whose TTFT met the objective, per second) at 1x, 2x and 3x the
#     knee's offered load, with the admission layer (engine cap = batch size, a queue of
#     about one second of work) and without it (no cap, an unbounded queue);
#  3. the flood scenario against its baseline (release-build figures), and how fast the
#     attacker's refusals come back.
# Output: the reports in $OUT (default target/bench-admission/).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
out=${OUT:-$repo/target/bench-admission}
seconds=${SECONDS_PER_RUN:-20}
slo=${TTFT_SLO:-2s}
mkdir -p "$out"
echo "==> building (release)"
cargo build --quiet --release -p switchyard-worker -p switchyard-cli --bins
bin="$repo/target/release"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
work=$(mktemp -d -t switchyard-adm.XXXXXX)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

# start_frontend CONFIG MAX_INFLIGHT: sets $addr and $pid.
start_frontend() {
  local port
  port=$(free_port)
  "$bin/switchyard-worker" --role frontend --model demo --admission-config "$1" --max-inflight "$2" \
    --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$(free_port)" >"$work/frontend.log" 2>&1 &
  pid=$!
  addr="http://127.0.0.1:$port"
  for _ in $(seq 300); do
    "$bin/switchyard" --addr "$addr" health --service switchyard.v1.Inference >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  cat "$work/frontend.log"; exit 1
}
stop_frontend() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=""; }
open_config() { # MAX_QUEUED
  echo "{\"tiers\": [], \"maxQueued\": $1, \"defaultDeadlineSeconds\": 30}" >"$work/open.json"
}
common=(--prompt-tokens 32 --output-tokens 32 --warmup 2s --timeout 10s --json --no-progress)

echo "==> the knee: closed loop, 32 in flight"
open_config 256
start_frontend "$work/open.json" 32
"$bin/switchyard" --addr "$addr" bench --concurrency 32 --duration "${seconds}s" "${common[@]}" >"$out/knee.json"
stop_frontend
knee=$(python3 -c "import json; print(round(json.load(open('$out/knee.json'))['total']['requests_per_s'], 2))")
echo "    knee: $knee req/s"

for m in 1 2 3; do
  rate=$(python3 -c "print(round($knee * $m, 2))")
  # About half a second of work: queued requests still start well within the objective.
  queued=$(python3 -c "print(max(1, int($knee / 2)))")
  echo "==> ${m}x the knee ($rate req/s), with admission (cap 32, queue $queued)"
  open_config "$queued"
  start_frontend "$work/open.json" 32
  "$bin/switchyard" --addr "$addr" bench --rate "$rate" --duration "${seconds}s" --ttft-slo "$slo" "${common[@]}" >"$out/with-$m.json" || true
  stop_frontend
  echo "==> ${m}x the knee ($rate req/s), without admission"
  open_config 100000
  start_frontend "$work/open.json" 100000
  "$bin/switchyard" --addr "$addr" bench --rate "$rate" --duration "${seconds}s" --ttft-slo "$slo" "${common[@]}" >"$out/without-$m.json" || true
  stop_frontend
done

echo "==> flood: three tenants at a third of the knee (1 request/s quota each), one attacker at 50x its quota"
mkdir -p "$work/keys"
printf 'team-a:team-a-key-0123456789:standard\nteam-b:team-b-key-0123456789:standard\nteam-c:team-c-key-0123456789:standard\nattacker:attacker-key-0123456789:standard\n' >"$work/keys/tenants"
quota=60
cat >"$work/keys.json" <<JSON
{"apiKeysDir": "$work/keys", "tiers": [{"name": "standard", "priority": "normal", "weight": 1, "requestsPerMinute": $quota}],
 "maxQueued": 256, "defaultDeadlineSeconds": 30}
JSON
printf 'team-a:team-a-key-0123456789\nteam-b:team-b-key-0123456789\nteam-c:team-c-key-0123456789\nattacker:attacker-key-0123456789\n' >"$work/tenants.txt"
legit=$(python3 -c "print(min(2.4, round($knee / 3, 2)))")
attack=$(python3 -c "print(round(50 * $quota / 60, 2))")
start_frontend "$work/keys.json" 32
for s in baseline flood; do
  "$bin/switchyard" --addr "$addr" bench --scenario "$s" --api-keys-file "$work/tenants.txt" --rate "$legit" \
    --attack-rate "$attack" --duration "${seconds}s" "${common[@]}" >"$out/$s.json" || true
done
stop_frontend
python3 - "$out" "$knee" <<'PY'
import json, sys, os
out, knee = sys.argv[1], float(sys.argv[2])
print(f"knee {knee} req/s")
for m in (1, 2, 3):
    for mode in ("with", "without"):
        p = os.path.join(out, f"{mode}-{m}.json")
        if not os.path.exists(p) or os.path.getsize(p) == 0:
            continue
        t = json.load(open(p))["total"]
        ttft = t.get("ttft") or {}
        print(f"{m}x {mode:7} goodput {t.get('goodput_per_s', 0):.2f} req/s, ok {t['ok']}/{t['requests']}, "
              f"errors {t['errors']}, TTFT p50 {ttft.get('p50_ms', 0):.0f} ms p99 {ttft.get('p99_ms', 0):.0f} ms")
for s in ("baseline", "flood"):
    p = os.path.join(out, f"{s}.json")
    if not os.path.exists(p) or os.path.getsize(p) == 0:
        continue
    for t in json.load(open(p))["tenants"]:
        ttft = t.get("ttft") or {}
        fe = t.get("failed_e2e") or {}
        print(f"{s:8} {t['name']:9} ok {t['ok']}/{t['requests']} TTFT p50 {ttft.get('p50_ms', 0):.1f} p99 {ttft.get('p99_ms', 0):.1f} ms; "
              f"refused {t['failed']} ({t['failed_with_pushback']} with pushback) in p50 {fe.get('p50_ms', 0):.2f} p99 {fe.get('p99_ms', 0):.2f} ms")
PY
