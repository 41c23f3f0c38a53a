#!/usr/bin/env bash
# workers.sh: what serving with workers costs and gives (issue 8), with wrk and bench/rpc.lua
# against the real binary. Server on CPU 0, wrk (and redis-server) on CPU 1; median of RUNS
# runs of DURATION seconds.
#
#   bench/workers.sh [BUILD_DIR]    env: DURATION (3), RUNS (3), CONNS (64)
#
# 1. LuaJIT's compiler on (a supervised worker: the default) versus off (--workers=0, the
#    previous default, where a handler time limit turns it off), on bench/compute.lua.
# 2. The supervisor's cost: one process (--workers=0) versus the supervisor + 1 worker, with
#    the defaults (so the compiler differs too) and with --handler-timeout=0 in both (the
#    compiler on in both: the supervisor alone).
# 3. Two workers (both on CPU 0, which they share): requests/s, and CPU time per request of
#    every mphost process (/proc), against one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BUILD=${1:-build-release}
MPHOST=$PWD/$BUILD/mphost
DURATION=${DURATION:-3}
RUNS=${RUNS:-3}
CONNS=${CONNS:-64}
WORK=$(mktemp -d)
SERVER_PID=""
REDIS_PID=""
trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null; [ -n "$REDIS_PID" ] && kill $REDIS_PID 2>/dev/null; rm -rf "$WORK"' EXIT

start() { # start SCRIPT ARGS...: mphost serve on CPU 0 (workers inherit the affinity)
  local script=$1; shift
  PORT=$(free_port)
  taskset -c 0 "$MPHOST" "$script" serve "$PORT" --listen=127.0.0.1 --logging=warn \
    --data="$WORK/data-$RANDOM" "$@" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT"
  sleep 0.2 # a supervisor's port accepts before every worker serves: let them all start
}

stop() { kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""; }

# run_case METHOD PARAMS CONNS -> "rps p50 p99 n cpu_us_per_request"
run_case() {
  local pids t0 t1 r
  mapfile -t pids < <(tree "$SERVER_PID")
  t0=$(cpu_ticks "${pids[@]}")
  r=$(wrk_median "$3" bench/rpc.lua METHOD="$1" PARAMS="$2")
  t1=$(cpu_ticks "${pids[@]}")
  read -r rps p50 p99 n <<<"$r"
  # ticks are 1/100 s; requests over all runs are about n * RUNS
  echo "$rps $p50 $p99 $n $(echo "scale=1; ($t1 - $t0) * 10000 / ($n * $RUNS)" | bc)"
}

row() { # row NAME CONNS "rps p50 p99 n cpu" [NOTE]
  read -r rps p50 p99 _ cpu <<<"$3"
  printf '| %s | %s | %s | %.2f | %.2f | %s | %s |\n' "$1" "$2" "$rps" \
    "$(echo "$p50/1000" | bc -l)" "$(echo "$p99/1000" | bc -l)" "$cpu" "${4:-}"
}

REDIS_PORT=$(free_port)
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --dir "$WORK" \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
wait_port "$REDIS_PORT"

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), $(nproc) cores, server on CPU 0, wrk on CPU 1," \
  "median of $RUNS x ${DURATION}s"
echo
echo "| case | connections | requests/s | p50 ms | p99 ms | CPU µs per request (all mphost processes) | note |"
echo "|---|---|---|---|---|---|---|"

# 1. The compiler.
start bench/compute.lua --workers=0
off=$(run_case compute '[]' 1); stop
row "compute, --workers=0 (compiler off)" 1 "$off"
start bench/compute.lua
on=$(run_case compute '[]' 1); stop
row "compute, supervisor + 1 worker (compiler on)" 1 "$on" \
  "ratio on/off $(echo "scale=2; ${on%% *}/${off%% *}" | bc)"

# 2. The supervisor, and 3. two workers.
ECHO='[{"hello":"world"}]'
for svc in echo file redis; do
  case $svc in
    echo) script=examples/server1.lua method=simple-service params=$ECHO extra=() ;;
    file) script=examples/server5.lua method=simple-storage params='[{}]' extra=() ;;
    redis) script=examples/server5.lua method=simple-storage params='[{}]'
      extra=(--storage=redis://127.0.0.1:$REDIS_PORT) ;;
  esac
  for mode in default limit0; do
    lim=(); [ $mode = limit0 ] && lim=(--handler-timeout=0)
    [ $svc = redis ] && redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
    start $script --workers=0 "${extra[@]}" "${lim[@]}"
    one=$(run_case $method "$params" "$CONNS"); stop
    row "$svc, --workers=0 ${lim[*]}" "$CONNS" "$one"
    [ $svc = redis ] && redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
    start $script --workers=1 "${extra[@]}" "${lim[@]}"
    sup=$(run_case $method "$params" "$CONNS"); stop
    row "$svc, supervisor + 1 worker ${lim[*]}" "$CONNS" "$sup" \
      "ratio $(echo "scale=3; ${sup%% *}/${one%% *}" | bc)"
  done
  [ $svc = redis ] && redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
  start $script --workers=2 "${extra[@]}"
  two=$(run_case $method "$params" "$CONNS"); stop
  row "$svc, supervisor + 2 workers" "$CONNS" "$two"
done
