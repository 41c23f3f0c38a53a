#!/usr/bin/env bash
# contention.sh: two mphost processes sharing one storage, each under full wrk load on the
# same hot key (server5). Shows whether commits are shared fairly and whether any call gives
# up (-32001). Both servers on CPU 0, both wrk on CPU 1.
#
#   bench/contention.sh [file|redis] [SECONDS] [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
KIND=${1:-file}
SECONDS_=${2:-10}
MPHOST=$PWD/${3:-build-release}/mphost
WORK=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 500); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.02; done; exit 1; }

STORAGE=(--data="$WORK/data")
if [ "$KIND" = redis ]; then
  RP=$(free_port)
  redis-server --port "$RP" --bind 127.0.0.1 --save "" --dir "$WORK" >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  wait_port "$RP"
  STORAGE=(--storage=redis://127.0.0.1:$RP)
fi
PORTS=()
for i in 1 2; do
  p=$(free_port)
  taskset -c 0 "$MPHOST" examples/server5.lua serve "$p" --listen=127.0.0.1 --logging=warn \
    "${STORAGE[@]}" >"$WORK/mphost-$i.log" 2>&1 &
  PIDS+=($!)
  wait_port "$p"
  PORTS+=("$p")
done
loaders=()
for p in "${PORTS[@]}"; do
  (METHOD=simple-storage PARAMS='[{}]' taskset -c 1 wrk -t1 -c32 -d"${SECONDS_}"s \
    -s bench/rpc.lua "http://127.0.0.1:$p/" | grep -E '^RESULT|^bad' | head -3 >"$WORK/wrk-$p") &
  loaders+=($!)
done
wait "${loaders[@]}"
for p in "${PORTS[@]}"; do echo "process on port $p: $(cat "$WORK/wrk-$p")"; done
echo "final count: $("$MPHOST" call simple-storage --url "http://127.0.0.1:${PORTS[0]}/")"
