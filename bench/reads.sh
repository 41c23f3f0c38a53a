#!/usr/bin/env bash
# reads.sh: what fresh reads cost (issue 21). Read-only calls of one scope, strict (every call
# checked against storage: docs/guarantees.md, "What a call sees") against cached
# (svc.reads = "cached"), on files and on Redis: one worker, 3 workers, and a second process
# on the same storage (the one measured is then one of two). Server on CPU 0, wrk (and
# redis-server) on CPU 1; the two kinds of read alternate, RUNS rounds each, medians; CPU time
# per request of every mphost process measured (/proc).
#
#   bench/reads.sh [BUILD_DIR]    env: DURATION (3), RUNS (5), CONNS (64)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init "${1:-}"
DURATION=${DURATION:-3}
RUNS=${RUNS:-5}
CONNS=${CONNS:-64}

call() { curl -s -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"$1\",\"params\":[]}" "http://127.0.0.1:$PORT/" >/dev/null; }

# case NAME PROCESSES STORAGE_ARGS...: the two kinds of read, alternating, on the last process
case_() {
  local name=$1 procs=$2; shift 2
  local data="$WORK/data-$RANDOM" pids strict=() cached=()
  [ "$procs" -eq 2 ] && start_server bench/reads.lua "$data" "$@"
  start_server bench/reads.lua "$data" "$@"
  call incr
  mapfile -t pids < <(for p in "${SERVERS[@]}"; do tree "$p"; done)
  local list
  list=$(IFS=,; echo "${pids[*]}")
  for _ in $(seq 1 "$RUNS"); do
    cached+=("$(measure_once "$CONNS" bench/rpc.lua "$list" METHOD=get_cached PARAMS='[]')")
    strict+=("$(measure_once "$CONNS" bench/rpc.lua "$list" METHOD=get PARAMS='[]')")
  done
  stop_servers
  local c s
  c=$(median_of "${cached[@]}")
  s=$(median_of "${strict[@]}")
  read -r crps _ cp99 _ ccpu _ <<<"$c"
  read -r srps _ sp99 _ scpu _ <<<"$s"
  printf '| %s | %s | %s | %.2f | %.2f | %s | %s | %s |\n' "$name" "$crps" "$srps" \
    "$(echo "$cp99/1000" | bc -l)" "$(echo "$sp99/1000" | bc -l)" "$ccpu" "$scpu" \
    "$(echo "scale=2; $srps / $crps" | bc)"
}

start_redis

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), $(nproc) cores, server on CPU 0, wrk on CPU 1," \
  "$CONNS connections, median of $RUNS x ${DURATION}s, the two kinds of read alternating"
echo
echo "| case | cached requests/s | strict requests/s | cached p99 ms | strict p99 ms | cached CPU µs/req | strict CPU µs/req | strict / cached |"
echo "|---|---|---|---|---|---|---|---|"
case_ "files, 1 process (--workers=0)" 1 --workers=0
case_ "files, 3 workers" 1 --workers=3
case_ "files, the second of 2 processes" 2 --workers=0
case_ "Redis, 1 process (--workers=0)" 1 --workers=0 "$REDIS"
case_ "Redis, 3 workers" 1 --workers=3 "$REDIS"
case_ "Redis, the second of 2 processes" 2 --workers=0 "$REDIS"
