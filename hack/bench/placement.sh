#!/usr/bin/env bash
# Expert placement under a skewed router (docs/benchmarks.md, "Expert placement"), all
# processes on loopback: one MoE layer of the 0.5 B bench checkpoint (16 experts, top-4,
# experts 768 wide) through `switchyard-worker bench-experts` with Zipf-skewed routes, on 2
# and 4 expert-shard processes holding
#   - the even spread (the operator's default),
#   - the balanced plan without spare slots,
#   - the balanced plan with 2 spare slots per shard,
# each planned by `switchyard-operator plan-placement` from the routes' own load report
# (as the operator plans from the frontends' GET /expert-load). Shard i is pinned to core
# i mod 2, so on 2 shards each has a core of its own and the busiest sets the layer's time.
# The variants run interleaved, $REPEATS times (default 5). After each run every shard's
# GET /load gives the (token, expert) rows it computed: the measured split.
# Prints each figure as it goes and a JSON line per run into $OUT (default
# target/bench-placement.jsonl); then the medians.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
cache=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
out=${OUT:-$repo/target/bench-placement.jsonl}
iterations=${ITERATIONS:-100}
tokens=${TOKENS:-8,32,128}
zipf=${ZIPF:-1.0}
repeats=${REPEATS:-5}
cores=$(nproc)
: >"$out"

echo "==> building (release)"
cargo build --quiet --release -p switchyard-worker -p switchyard-cli -p switchyard-operator --bins
bin="$repo/target/release"
model="$cache/bench-qwen3-moe-0.5b-v2"
[ -f "$model/model.safetensors" ] || "$bin/switchyard-worker" make-checkpoint --shape bench --out "$model"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
work=$(mktemp -d -t switchyard-placement.XXXXXX)
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"' EXIT

# start_shards N FILE: N shards, shard i holding entry i of placement FILE, pinned to
# core i mod nproc; sets $addrs and $metrics (their metrics addresses).
start_shards() {
  local n=$1 file=$2 list=() mlist=()
  for i in $(seq 0 $((n - 1))); do
    local port mport
    port=$(free_port)
    mport=$(free_port)
    taskset -c $((i % cores)) "$bin/switchyard-worker" --role expert-shard --model "$model" \
      --placement "$file" --shard-index "$i" \
      --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$mport" >"$work/shard-$i.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 300); do
      "$bin/switchyard" --addr "http://127.0.0.1:$port" health --service switchyard.expert.v1.ExpertShard >/dev/null 2>&1 && break
      sleep 0.2
    done
    list+=("127.0.0.1:$port")
    mlist+=("127.0.0.1:$mport")
  done
  addrs=$(IFS=,; echo "${list[*]}")
  metrics=$(IFS=,; echo "${mlist[*]}")
}
stop_shards() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null || true
  pids=()
}

echo "==> the routes' load (Zipf $zipf)"
"$bin/switchyard-worker" bench-experts --model "$model" --zipf "$zipf" --load-out "$work/load.json"
for rep in $(seq "$repeats"); do
  echo "==> repeat $rep of $repeats: in process (every expert local, no transport)"
  "$bin/switchyard-worker" bench-experts --model "$model" --zipf "$zipf" --tokens "$tokens" \
    --iterations "$iterations" |
    REP="$rep" python3 -c 'import json,os,sys; r=json.load(sys.stdin); r.update(placement="in-process", shards=0, repeat=int(os.environ["REP"])); print(json.dumps(r))' >>"$out"
  for n in 2 4; do
    for variant in even balanced balanced+spare; do
      case $variant in
        even) plan=(--strategy even-spread) ;;
        balanced) plan=(--strategy balanced) ;;
        balanced+spare) plan=(--strategy balanced --redundant-experts $((2 * n))) ;;
      esac
      echo "==> repeat $rep: $n shards, $variant"
      "$bin/switchyard-operator" plan-placement --load "$work/load.json" --shards "$n" "${plan[@]}" \
        >"$work/placement.json" 2>"$work/plan.txt"
      cat "$work/plan.txt"
      start_shards "$n" "$work/placement.json"
      # One bench-experts per batch size, each shard's compute seconds read around it:
      # the busiest shard's compute per call is the layer's time when each shard has
      # hardware of its own, which two shared vCPUs cannot show in the wall time.
      for t in ${tokens//,/ }; do
        before=()
        for m in ${metrics//,/ }; do before+=("$(curl -fsS "http://$m/metrics" | awk '/^switchyard_shard_compute_seconds_sum/ {print $2}')"); done
        "$bin/switchyard-worker" bench-experts --model "$model" --expert-shards "$addrs" --zipf "$zipf" \
          --tokens "$t" --iterations "$iterations" >"$work/run.json"
        after=()
        rows=()
        for m in ${metrics//,/ }; do
          after+=("$(curl -fsS "http://$m/metrics" | awk '/^switchyard_shard_compute_seconds_sum/ {print $2}')")
          rows+=("$(curl -fsS "http://$m/load")")
        done
        RUN="$work/run.json" BEFORE="${before[*]}" AFTER="${after[*]}" LOADS="$(IFS=$'\n'; echo "${rows[*]}")" \
          PLAN="$(cat "$work/plan.txt")" VARIANT="$variant" SHARDS="$n" REP="$rep" CALLS=$((iterations + 10)) \
          python3 -c '
import json, os
r = json.load(open(os.environ["RUN"]))
compute = [float(a) - float(b) for a, b in zip(os.environ["AFTER"].split(), os.environ["BEFORE"].split())]
rows = [json.loads(l)["expertRowsProcessedTotal"] for l in os.environ["LOADS"].splitlines()]
calls = int(os.environ["CALLS"])
r.update(placement=os.environ["VARIANT"], shards=int(os.environ["SHARDS"]), repeat=int(os.environ["REP"]),
         plan=os.environ["PLAN"], shard_rows_so_far=rows, rows_imbalance=max(rows) * len(rows) / sum(rows),
         shard_compute_seconds=compute, compute_imbalance=max(compute) * len(compute) / sum(compute),
         busiest_compute_us_per_call=max(compute) / calls * 1e6,
         total_compute_us_per_call=sum(compute) / calls * 1e6)
print(json.dumps(r))' >>"$out"
      done
      stop_shards
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
order = ["in-process", "even", "balanced", "balanced+spare"]
keys = sorted({(r["shards"], r["placement"]) for r in runs}, key=lambda k: (k[0], order.index(k[1])))
tokens = sorted({x["tokens"] for r in runs for x in r["results"]})
med = statistics.median
print("| shards | placement | tokens | rows max/mean | compute max/mean | busiest shard's compute per call (µs) | all shards' compute per call (µs) | wall p50 (µs) |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for k in keys:
    for t in tokens:
        rs = [r for r in runs if (r["shards"], r["placement"]) == k and any(x["tokens"] == t for x in r["results"])]
        wall = med(x["p50_us"] for r in rs for x in r["results"] if x["tokens"] == t)
        if k[0] == 0:
            print(f"| 0 | in-process | {t} | | | | | {wall:,.0f} |")
            continue
        total = med(r["total_compute_us_per_call"] for r in rs)
        print(f"| {k[0]} | {k[1]} | {t} | {med(r['rows_imbalance'] for r in rs):.3f} | {med(r['compute_imbalance'] for r in rs):.3f} | "
              f"{med(r['busiest_compute_us_per_call'] for r in rs):,.0f} | {total:,.0f} | {wall:,.0f} |")
PY
echo "==> figures in $out"
