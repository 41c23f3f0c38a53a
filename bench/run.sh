#!/usr/bin/env bash
# run.sh: benchmarks of the real binary with wrk (bench/rpc.lua). The server is pinned to
# CPU 0 and wrk to CPU 1; each figure is the median of RUNS runs of DURATION seconds.
#
#   bench/run.sh [BUILD_DIR]        env: DURATION (3), RUNS (3), CONNS ("1 16 64")
#
# Prints a markdown table: requests/s, p50 and p99 latency; for file storage the syncs
# (fsync + fdatasync) per request, counted by the file backend itself; for Redis the Redis
# commands per request (INFO commandstats before and after). redis-server (default
# persistence) shares CPU 1 with wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BUILD=${1:-build-release}
MPHOST=$PWD/$BUILD/mphost
DURATION=${DURATION:-3}
RUNS=${RUNS:-3}
CONNS=${CONNS:-"1 16 64"}
WORK=$(mktemp -d)
SERVER_PID=""
REDIS_PID=""
trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null; [ -n "$REDIS_PID" ] && kill $REDIS_PID 2>/dev/null; rm -rf "$WORK"' EXIT

# start NAME CMD...: runs CMD pinned to CPU 0 on a free $PORT (written @PORT@ in CMD);
# output to $WORK/NAME.log
start() {
  local name=$1; shift
  PORT=$(free_port)
  local args=()
  for a in "$@"; do args+=("${a//@PORT@/$PORT}"); done
  taskset -c 0 "${args[@]}" >"$WORK/$name.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT"
}

stop() {
  kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""
}

# measure METHOD PARAMS CONNS -> "rps p50_us p99_us" (median run by requests/s)
measure() {
  local out=()
  for _ in $(seq 1 "$RUNS"); do
    out+=("$(METHOD=$1 PARAMS=$2 taskset -c 1 wrk -t1 -c"$3" -d"${DURATION}"s \
      -s bench/rpc.lua "http://127.0.0.1:$PORT/" | awk '/^RESULT/ {
        split($2,a,"="); split($3,b,"="); split($4,c,"="); print a[2], b[2], c[2] }')")
  done
  printf '%s\n' "${out[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"
}

call() { "$MPHOST" call "$1" "$2" --url "http://127.0.0.1:$PORT/"; }

row() { # row NAME CONNS "rps p50 p99" [syncs/request]
  read -r rps p50 p99 <<<"$3"
  printf '| %s | %s | %s | %.2f | %.2f | %s |\n' "$1" "$2" "$rps" "$(echo "$p50/1000" | bc -l)" \
    "$(echo "$p99/1000" | bc -l)" "${4:--}"
}

# "ROUND_TRIPS COMMANDS" executed so far: round trips are EVAL/EVALSHA calls (one per
# commit or load); commands also count those run inside the scripts (all but INFO itself).
redis_commands() {
  redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' | grep -v '^cmdstat_info:' |
    sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),.*/\1 \2/p' |
    awk '$1 == "evalsha" || $1 == "eval" { t += $2 } { s += $2 } END { print t + 0, s + 0 }'
}

# per_request BEFORE AFTER N -> "X trips, Y cmds" per request
per_request() {
  read -r t0 c0 <<<"$1"
  read -r t1 c1 <<<"$2"
  printf '%s trips, %s cmds' "$(echo "scale=3; ($t1-$t0)/$3" | bc)" "$(echo "scale=3; ($c1-$c0)/$3" | bc)"
}

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), $(nproc) cores, server on CPU 0, wrk on CPU 1," \
  "median of $RUNS x ${DURATION}s"
echo
echo "| service | connections | requests/s | p50 ms | p99 ms | storage work per request |"
echo "|---|---|---|---|---|---|"

ECHO_PARAMS='[{"hello":"world"}]'
for c in $CONNS; do
  start echo "$MPHOST" examples/server1.lua serve @PORT@ --listen=127.0.0.1 --logging=warn --data="$WORK/d1"
  row "server1 (echo), mphost" "$c" "$(measure simple-service "$ECHO_PARAMS" "$c")"
  stop
  if command -v node >/dev/null; then
    start node node bench/node_echo.js @PORT@
    row "echo, Node.js $(node --version) http" "$c" "$(measure simple-service "$ECHO_PARAMS" "$c")"
    stop
  fi
done

# file_case LABEL SCRIPT FILL CONNS: server5's counter on a fresh data directory, after
# `fill FILL` keys (if FILL) and a restart, so the backend's sync counter covers exactly the
# measured calls. Prints the row; leaves the requests/s in LAST_RPS.
file_case() {
  local label=$1 script=$2 fill=$3 c=$4 dir
  dir=$(mktemp -d -p "$WORK")
  if [ -n "$fill" ]; then
    start prep "$MPHOST" "$script" serve @PORT@ --listen=127.0.0.1 --logging=warn --data="$dir"
    call fill "[$fill]" >/dev/null
    stop
  fi
  start file "$MPHOST" "$script" serve @PORT@ --listen=127.0.0.1 --logging=info --data="$dir"
  call simple-storage '[{}]' >/dev/null # loads the scope before measuring (counted in n, too)
  local r n syncs
  r=$(measure simple-storage '[{}]' "$c")
  n=$(call simple-storage '[{}]' | tr -dc 0-9)
  stop
  syncs=$(sed -n 's/.*file storage: [0-9]* commits, \([0-9]*\) syncs.*/\1/p' "$WORK/file.log")
  row "$label" "$c" "$r" "$(echo "scale=4; $syncs/$n" | bc)"
  LAST_RPS=${r%% *}
}

declare -A SMALL
for c in $CONNS; do
  file_case "server5, file storage" examples/server5.lua "" "$c"
  SMALL[$c]=$LAST_RPS
done
for c in $CONNS; do
  file_case "server5 + 100,000 other keys, file" bench/big.lua 100000 "$c"
  echo "| ratio 100,000-key / 1-key scope at $c | | $(echo "scale=2; $LAST_RPS/${SMALL[$c]}" | bc) | | | |"
done

# Redis: one and two mphost processes (both on CPU 0), each level on a fresh database.
REDIS_PORT=$(free_port)
taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --dir "$WORK" \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
wait_port "$REDIS_PORT"
# redis_case LABEL SCRIPT FILL CONNS: like file_case, on a flushed Redis; the work per
# request is counted from INFO commandstats around the measured calls.
redis_case() {
  local label=$1 script=$2 fill=$3 c=$4 before after r n
  redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
  if [ -n "$fill" ]; then # filled, then a restart: the scope is loaded from Redis, as in use
    start redis-prep "$MPHOST" "$script" serve @PORT@ --listen=127.0.0.1 --logging=warn \
      --storage=redis://127.0.0.1:$REDIS_PORT
    call fill "[$fill]" >/dev/null
    stop
  fi
  start redis-case "$MPHOST" "$script" serve @PORT@ --listen=127.0.0.1 --logging=warn \
    --storage=redis://127.0.0.1:$REDIS_PORT
  call simple-storage '[{}]' >/dev/null # loads the scope before measuring
  before=$(redis_commands)
  r=$(measure simple-storage '[{}]' "$c")
  n=$(call simple-storage '[{}]' | tr -dc 0-9)
  after=$(redis_commands)
  stop
  row "$label" "$c" "$r" "$(per_request "$before" "$after" "$n")"
  LAST_RPS=${r%% *}
}

declare -A SMALL_REDIS
for c in $CONNS; do
  redis_case "server5, Redis" examples/server5.lua "" "$c"
  SMALL_REDIS[$c]=$LAST_RPS
done

# Two processes: two wrk (CPU 1) against two mphost (CPU 0) at once; requests/s summed.
for c in $CONNS; do
  [ "$c" -lt 2 ] && continue
  redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
  start r5a "$MPHOST" examples/server5.lua serve @PORT@ --listen=127.0.0.1 --logging=warn \
    --storage=redis://127.0.0.1:$REDIS_PORT
  PA=$PORT A=$SERVER_PID
  start r5b "$MPHOST" examples/server5.lua serve @PORT@ --listen=127.0.0.1 --logging=warn \
    --storage=redis://127.0.0.1:$REDIS_PORT
  PB=$PORT B=$SERVER_PID
  before=$(redis_commands)
  totals=()
  for _ in $(seq 1 "$RUNS"); do
    loaders=()
    for p in $PA $PB; do
      (METHOD=simple-storage PARAMS='[{}]' taskset -c 1 wrk -t1 -c$((c / 2)) -d"${DURATION}"s \
        -s bench/rpc.lua "http://127.0.0.1:$p/" | awk '/^RESULT/ { split($2,a,"="); print a[2] }' \
        >"$WORK/wrk-$p") &
      loaders+=($!)
    done
    wait "${loaders[@]}"
    totals+=("$(( $(cat "$WORK/wrk-$PA") + $(cat "$WORK/wrk-$PB") ))")
  done
  PORT=$PA
  n=$(call simple-storage '[{}]' | tr -dc 0-9)
  after=$(redis_commands)
  kill -TERM "$A" "$B"; wait "$A" "$B" || true; SERVER_PID=""
  median=$(printf '%s\n' "${totals[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")
  printf '| server5, Redis, 2 mphost processes | %s (%s each) | %s | | | %s |\n' "$c" \
    "$((c / 2))" "$median" "$(per_request "$before" "$after" "$n")"
  echo "| ratio 2 processes / 1 process at $c | | $(echo "scale=2; $median/${SMALL_REDIS[$c]}" | bc) | | | |"
done

for c in $CONNS; do
  redis_case "server5 + 100,000 other keys, Redis" bench/big.lua 100000 "$c"
  echo "| ratio 100,000-key / 1-key scope at $c | | $(echo "scale=2; $LAST_RPS/${SMALL_REDIS[$c]}" | bc) | | | |"
done
