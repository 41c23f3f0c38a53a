#!/usr/bin/env bash
# idempotency.sh: what an Idempotency-Key costs (issue 23, docs/idempotency.md). The same call
# with a key of its own on every request (its reply committed as a record in a bucket scope,
# with its writes) against the call without one, alternating, RUNS rounds each, medians:
#   - a counter in the global scope, and deposits spread over ACCOUNTS named scopes, one
#     process, on files and on Redis;
#   - deposits spread over ACCOUNTS named scopes from two processes sharing Redis at once (one
#     wrk each, half the connections each): the commits refused by conflicts per call, from
#     both processes' /metrics, show what the buckets' false conflicts add.
# Server on CPU 0, wrk (and redis-server) on CPU 1.
#
#   bench/idempotency.sh [BUILD_DIR]    env: DURATION (3), RUNS (3), CONNS (64), ACCOUNTS (64)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init "${1:-}"
DURATION=${DURATION:-3}
RUNS=${RUNS:-3}
CONNS=${CONNS:-64}
ACCOUNTS=${ACCOUNTS:-64}

# start DATA ARGS...: one process (--workers=0) of bench/idempotency.lua
start() { start_server bench/idempotency.lua "$@" --workers=0; }

# accounts METHOD -> SPREAD=N (bench/rpc.lua) for deposits (each request into one of N accounts)
accounts() { if [ "$1" = deposit ]; then echo "SPREAD=$ACCOUNTS"; fi; }

metric() { # metric PORT NAME -> its value
  curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}

# counter NAME METHOD STORAGE_ARGS...: METHOD without and with a key, alternating, on one
# process
counter() {
  local name=$1 method=$2; shift 2
  local plain=() keyed=() pids list
  start "$WORK/data-$RANDOM" "$@"
  mapfile -t pids < <(tree "${SERVERS[0]}")
  list=$(IFS=,; echo "${pids[*]}")
  for _ in $(seq 1 "$RUNS"); do
    plain+=("$(measure_once "$CONNS" bench/rpc.lua "$list" METHOD="$method" PARAMS=[] KEYED=0 $(accounts "$method"))")
    keyed+=("$(measure_once "$CONNS" bench/rpc.lua "$list" METHOD="$method" PARAMS=[] KEYED=1 $(accounts "$method"))")
  done
  local replays
  replays=$(metric "$PORT" mphost_idempotent_replays_total)
  stop_servers
  local p k
  p=$(median_of "${plain[@]}")
  k=$(median_of "${keyed[@]}")
  read -r prps _ pp99 _ pcpu _ <<<"$p"
  read -r krps _ kp99 _ kcpu _ <<<"$k"
  printf '| %s | %s | %s | %.2f | %.2f | %s | %s | %s | %s |\n' "$name" "$prps" "$krps" \
    "$(echo "$pp99/1000" | bc -l)" "$(echo "$kp99/1000" | bc -l)" "$pcpu" "$kcpu" \
    "$(echo "scale=2; $krps / $prps" | bc)" "$replays"
}

# two KEYED: deposits from two processes sharing Redis at once; prints "calls/s conflicts/call"
two() {
  local keyed=$1 data="$WORK/data-$RANDOM" a b
  start "$data" "$REDIS"; a=$PORT
  start "$data" "$REDIS"; b=$PORT
  local half=$(( CONNS / 2 )) wrks=()
  for port in "$a" "$b"; do
    env METHOD=deposit KEYED="$keyed" SPREAD="$ACCOUNTS" taskset -c 1 wrk -t1 -c"$half" \
      -d"${DURATION}"s -s bench/rpc.lua "http://127.0.0.1:$port/" >"$WORK/wrk-$port.out" &
    wrks+=($!)
  done
  wait "${wrks[@]}"
  local calls=0 conflicts=0 port
  for port in "$a" "$b"; do
    calls=$(( calls + $(awk '/^RESULT/ { split($5,d,"="); print d[2] }' "$WORK/wrk-$port.out") ))
    conflicts=$(( conflicts + $(metric "$port" mphost_conflicts_total) ))
  done
  stop_servers
  echo "$(( calls / DURATION )) $(echo "scale=3; $conflicts / $calls" | bc)"
}

start_redis

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), $(nproc) cores, server on CPU 0, wrk on CPU 1," \
  "$CONNS connections, median of $RUNS x ${DURATION}s, with and without a key alternating"
echo
echo "| one process | no key requests/s | unique key requests/s | no key p99 ms | key p99 ms | no key CPU µs/req | key CPU µs/req | key / no key | replays |"
echo "|---|---|---|---|---|---|---|---|---|"
counter "counter (incr), files" incr --storage=file
counter "counter (incr), Redis" incr "$REDIS"
counter "deposits over $ACCOUNTS accounts, files" deposit --storage=file
counter "deposits over $ACCOUNTS accounts, Redis" deposit "$REDIS"
echo
echo "| deposits over $ACCOUNTS accounts, 2 processes on Redis at once | calls/s | conflicts per call |"
echo "|---|---|---|"
read -r r c <<<"$(two 0)"; echo "| no key | $r | $c |"
read -r r c <<<"$(two 1)"; echo "| a unique key per call | $r | $c |"
