#!/usr/bin/env bash
# scopes.sh: named scopes and transactions over several scopes (issue 9), with wrk and
# bench/transfer.lua against the real binary (--workers=0: one process, as bench/run.sh).
# The server is pinned to CPU 0, wrk to CPU 1 (redis-server shares CPU 1); each figure is
# the median of RUNS runs of DURATION seconds.
#
#   bench/scopes.sh [BUILD_DIR]     env: DURATION (3), RUNS (3), CONNS (64), ACCOUNTS (10000)
#
# Rows: transfers between ACCOUNTS accounts (two scopes per call), a counter on one hot named
# scope versus one of ACCOUNTS named scopes, and chapter 7's per-user counter with HTTP Basic
# authentication (a warm cache) versus the same work without it. Conflicts per call are the
# runner's own count (logged when the server stops).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BUILD=${1:-build-release}
MPHOST=$PWD/$BUILD/mphost
DURATION=${DURATION:-3}
RUNS=${RUNS:-3}
CONNS=${CONNS:-64}
ACCOUNTS=${ACCOUNTS:-10000}
WORK=$(mktemp -d)
SERVER_PID=""
REDIS_PID=""
trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null; [ -n "$REDIS_PID" ] && kill $REDIS_PID 2>/dev/null; rm -rf "$WORK"' EXIT

start() { # start LOG ARGS...: mphost on CPU 0 serving bench/bank.lua on a free $PORT
  local log=$1; shift
  PORT=$(free_port)
  taskset -c 0 env "${ENVS[@]}" "$MPHOST" bench/bank.lua serve "$PORT" --listen=127.0.0.1 \
    --workers=0 --logging=info "$@" >"$WORK/$log.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT"
}

stop() { kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""; }

# measure MODE ACCOUNTS [AUTH] -> "rps p50_us p99_us requests" (median run by requests/s)
measure() {
  wrk_median "$CONNS" bench/transfer.lua MODE="$1" ACCOUNTS="$2" METHOD=user_count AUTH="${3:-}"
}

# conflicts per call from the runner's line in LOG ("... N calls, ... M conflicts")
conflicts() {
  sed -n 's/.*transactions: \([0-9]*\) calls, [0-9]* attempts, [0-9]* commits, \([0-9]*\) conflicts.*/\1 \2/p' \
    "$WORK/$1.log" | awk '{ c += $1; k += $2 } END { if (c) printf "%.3f", k / c; else print "-" }'
}

row() { # row NAME STORAGE "rps p50 p99 n" CONFLICTS
  read -r rps p50 p99 _ <<<"$3"
  printf '| %s | %s | %s | %.2f | %.2f | %s |\n' "$1" "$2" "$rps" "$(echo "$p50/1000" | bc -l)" \
    "$(echo "$p99/1000" | bc -l)" "$4"
}

REDIS_PORT=$(free_port)
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --dir "$WORK" \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
wait_port "$REDIS_PORT"

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), $(nproc) cores, server on CPU 0, wrk on CPU 1," \
  "$CONNS connections, median of $RUNS x ${DURATION}s"
echo
echo "| workload | storage | calls/s | p50 ms | p99 ms | conflicts per call |"
echo "|---|---|---|---|---|---|"
ENVS=(MPH_BENCH=1)
for storage in file redis; do
  if [ $storage = file ]; then args=(--data="$WORK/data-$RANDOM"); else
    redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null; args=(--storage=redis://127.0.0.1:$REDIS_PORT); fi
  start "t-$storage" "${args[@]}"
  r=$(measure transfer "$ACCOUNTS"); stop
  row "transfers between $ACCOUNTS accounts" $storage "$r" "$(conflicts t-$storage)"
  for n in 1 "$ACCOUNTS"; do
    if [ $storage = file ]; then args=(--data="$WORK/data-$RANDOM"); else
      redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null; fi
    start "c-$storage-$n" "${args[@]}"
    r=$(measure count "$n"); stop
    row "counter, one of $n named scopes" $storage "$r" "$(conflicts c-$storage-$n)"
  done
done

# Chapter 7's counter: with basic auth (a yescrypt hash, verified once per connection and
# then from the cache) and without.
printf 'bench-secret\n' | "$MPHOST" passwd "$WORK/users.txt" bench >/dev/null
for auth in 0 1; do
  ENVS=(BENCH_AUTH=$auth)
  start "u-$auth" --data="$WORK/data-$RANDOM" --users="$WORK/users.txt"
  if [ $auth = 1 ]; then r=$(measure fixed 1 bench:bench-secret); else r=$(measure fixed 1); fi
  stop
  row "per-user counter, $([ $auth = 1 ] && echo 'basic auth' || echo 'no auth')" file "$r" \
    "$(conflicts u-$auth)"
  eval "RPS_AUTH_$auth=\${r%% *}"
done
echo "| ratio auth / no auth | | $(echo "scale=3; $RPS_AUTH_1/$RPS_AUTH_0" | bc) | | | |"
