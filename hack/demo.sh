#!/usr/bin/env bash
# `make demo`: builds the worker and the CLI, starts a frontend worker on a free loopback
# port, and shows what a client sees: health (liveness and readiness) and the advertised
# services. Stops the worker on exit, whatever happens.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

echo "==> building switchyard-worker and switchyard (first build takes a few minutes)"
cargo build --quiet -p switchyard-worker --bins
bin="$repo/target/debug"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp -t switchyard-demo.XXXXXX.log)
"$bin/switchyard-worker" --role frontend --listen "127.0.0.1:$port" >"$log" 2>&1 &
worker=$!
trap 'kill $worker 2>/dev/null; wait $worker 2>/dev/null; rm -f "$log"' EXIT

addr="http://127.0.0.1:$port"
echo "==> started a frontend worker (pid $worker) on $addr"
for _ in $(seq 100); do
  "$bin/switchyard" --addr "$addr" health >/dev/null 2>&1 && break
  kill -0 $worker 2>/dev/null || { echo "the worker exited:"; cat "$log"; exit 1; }
  sleep 0.1
done

echo "==> switchyard health            (liveness: is the process up?)"
"$bin/switchyard" --addr "$addr" health
echo "==> switchyard health --service switchyard.v1.Inference   (readiness)"
"$bin/switchyard" --addr "$addr" health --service switchyard.v1.Inference ||
  echo "    not ready: no inference engine is wired into the worker yet, so it never claims to serve"
echo "==> switchyard services          (gRPC server reflection)"
"$bin/switchyard" --addr "$addr" services
echo "==> worker log"
sed 's/^/    /' "$log"
