#!/usr/bin/env bash
# Expert-parallel benchmarks (docs/benchmarks.md), all processes on loopback:
#  1. one MoE layer's dispatch + combine latency (p50/p99) for 1, 32 and 128 tokens at
#     hidden 2048, 64 experts, top-8 (`make-checkpoint --shape ep-bench`), in process and
#     on 2 and 4 expert-shard processes;
#  2. decode tokens/s at batch 1, 8 and 32 on the 0.5 B bench checkpoint: all-local versus
#     2 shards, with and without the two-micro-batch overlap.
# Prints each figure as it is measured and a JSON line per run into $OUT (default
# target/bench-expert-parallel.jsonl).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
cache=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
out=${OUT:-$repo/target/bench-expert-parallel.jsonl}
iterations=${ITERATIONS:-200}
batches=${BATCHES:-1,8,32}
: >"$out"

echo "==> building (release)"
cargo build --quiet --release -p switchyard-worker -p switchyard-cli --bins
bin="$repo/target/release"
ep="$cache/ep-bench-v1"
big="$cache/bench-qwen3-moe-0.5b-v2"
[ -f "$ep/model.safetensors" ] || "$bin/switchyard-worker" make-checkpoint --shape ep-bench --out "$ep"
[ -f "$big/model.safetensors" ] || "$bin/switchyard-worker" make-checkpoint --shape bench --out "$big"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
logdir=$(mktemp -d -t switchyard-ep.XXXXXX)
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$logdir"' EXIT

# start_shards MODEL N: starts N shards each holding 1/N of the experts; sets $addrs.
start_shards() {
  local model=$1 n=$2 list=()
  for i in $(seq 0 $((n - 1))); do
    local port
    port=$(free_port)
    "$bin/switchyard-worker" --role expert-shard --model "$model" --shard-count "$n" --shard-index "$i" \
      --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$(free_port)" >"$logdir/shard-$i.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 300); do
      "$bin/switchyard" --addr "http://127.0.0.1:$port" health --service switchyard.expert.v1.ExpertShard >/dev/null 2>&1 && break
      sleep 0.2
    done
    list+=("127.0.0.1:$port")
  done
  addrs=$(IFS=,; echo "${list[*]}")
}
stop_shards() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null || true
  pids=()
}

echo "==> dispatch + combine latency, in process (expert compute only)"
"$bin/switchyard-worker" bench-experts --model "$ep" --iterations "$iterations" >>"$out"
for n in 2 4; do
  echo "==> dispatch + combine latency, $n shards"
  start_shards "$ep" "$n"
  "$bin/switchyard-worker" bench-experts --model "$ep" --expert-shards "$addrs" --iterations "$iterations" >>"$out"
  stop_shards
done

echo "==> decode throughput, all-local"
"$bin/switchyard-worker" bench --model "$big" --batch "$batches" --prompt-len 128 --decode-len 32 >>"$out"
start_shards "$big" 2
for overlap in true false; do
  echo "==> decode throughput, 2 shards, overlap $overlap"
  "$bin/switchyard-worker" bench --model "$big" --batch "$batches" --prompt-len 128 --decode-len 32 \
    --expert-shards "$addrs" --overlap "$overlap" >>"$out"
done
stop_shards
echo "==> figures in $out"
