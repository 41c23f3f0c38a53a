#!/usr/bin/env bash
# hosts.sh: what forwarding a sharded call to another host costs (docs/hosts.md). Two hosts of
# bench/hosts.lua on loopback (--peers, a shared redis-server, one worker each), whose one
# shard lives on host 1. Three measurements of the echo call (bench/rpc.lua), in turns, each
# round: "sharded" sent to host 1 (answered where it arrives), "sharded" sent to host 2
# (forwarded to host 1 over HTTP keep-alive, signed and checked), and host 2's unrouted
# "simple-service". Prints requests/s, latency and the CPU time of both hosts per request of
# each, the ratio of forwarded to local calls/s and the latency forwarding adds; medians of
# RUNS runs.
#
#   bench/hosts.sh [BUILD_DIR]      env: DURATION (3), RUNS (5), CONNS ("16 64")
#
# Both hosts run on CPU 0, wrk on CPU 1 (redis-server too: the calls touch no scope).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init "${1:-}"
DURATION=${DURATION:-3}
RUNS=${RUNS:-5}
CONNS=${CONNS:-"16 64"}

REDIS_PORT=$(free_port)
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --daemonize no \
  --logfile "$WORK/redis.log" &
PIDS_TO_KILL+=("$!")
wait_port "$REDIS_PORT"
(umask 077 && openssl rand -hex 32 >"$WORK/peer.secret")

H1=$(free_port)
H2=$(free_port)
PEERS="http://127.0.0.1:$H1,http://127.0.0.1:$H2"
for id in 1 2; do
  port=$H1
  [ "$id" = 2 ] && port=$H2
  MP_STATE_DIR=$WORK/state$id taskset -c 0 "$MPHOST" bench/hosts.lua serve "$port" \
    --listen=127.0.0.1 --logging=warn --storage="redis://127.0.0.1:$REDIS_PORT" \
    --peers="$PEERS" --host-id="$id" --peer-secret-file="$WORK/peer.secret" \
    >"$WORK/host$id.log" 2>&1 &
  PIDS_TO_KILL+=("$!")
  eval "PID$id=\$!"
done
wait_port "$H1"
wait_port "$H2"
sleep 0.3 # the ports accept before the workers serve
WORKERS=$( (tree "$PID1" | tail -n +2; tree "$PID2" | tail -n +2) | paste -sd,)

BODY='{"jsonrpc":"2.0","id":1,"method":"%s","params":[{"hello":"world"}]}'
for target in "sharded $H1" "sharded $H2" "simple-service $H2"; do
  read -r m p <<<"$target"
  # shellcheck disable=SC2059
  answer=$(curl -s -d "$(printf "$BODY" "$m")" "http://127.0.0.1:$p/")
  case "$answer" in *'"result"'*) ;; *) echo "$m on $p answered: $answer" >&2; exit 1 ;; esac
done

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), libcurl $(curl-config --version | cut -d' ' -f2);" \
  "$(nproc) cores: both hosts on CPU 0, wrk on CPU 1; median of $RUNS x ${DURATION}s, taken in turns"
echo
echo "| call | connections | requests/s | p50 ms | p99 ms | CPU µs/request (both hosts) |"
echo "|---|---|---|---|---|---|"
for c in $CONNS; do
  here=() forwarded=() plain=()
  for _ in $(seq 1 "$RUNS"); do
    PORT=$H1
    here+=("$(measure_once "$c" bench/rpc.lua "$WORKERS" METHOD=sharded)")
    PORT=$H2
    forwarded+=("$(measure_once "$c" bench/rpc.lua "$WORKERS" METHOD=sharded)")
    plain+=("$(measure_once "$c" bench/rpc.lua "$WORKERS")")
  done
  h=$(median_of "${here[@]}")
  f=$(median_of "${forwarded[@]}")
  p=$(median_of "${plain[@]}")
  md_row "sharded, answered on the receiving host" "$c" "$h"
  md_row "sharded, forwarded to another host" "$c" "$f"
  md_row "not routed (simple-service)" "$c" "$p"
  read -r hrps hp50 _ <<<"$h"
  read -r frps fp50 _ <<<"$f"
  printf '| **forwarded / here** | %s | **%.2f** | +%.2f | | |\n' "$c" \
    "$(echo "$frps / $hrps" | bc -l)" "$(echo "($fp50 - $hp50) / 1000" | bc -l)"
done
