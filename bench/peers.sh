#!/usr/bin/env bash
# peers.sh: mphost against the OpenResty-style peer (nginx with Debian's Lua module and
# lua-cjson, bench/peers/nginx.conf, one worker) on the echo call, in the same run: the same
# request (bench/rpc.lua), each server pinned to CPU 0 and wrk to CPU 1, the two servers
# measured in turn for each of RUNS rounds. Prints requests/s, latency, CPU time and system
# calls per request of each, and the ratio of the medians.
#
#   bench/peers.sh [BUILD_DIR]      env: DURATION (3), RUNS (5), CONNS ("16 64")
#
# Needs nginx-core, libnginx-mod-http-lua and lua-cjson (`./dev bench-deps`).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BUILD=${1:-build-release}
MPHOST=$PWD/$BUILD/mphost
DURATION=${DURATION:-3}
RUNS=${RUNS:-5}
CONNS=${CONNS:-"16 64"}
WORK=$(mktemp -d)
PIDS_TO_KILL=()
trap 'kill "${PIDS_TO_KILL[@]}" 2>/dev/null; rm -rf "$WORK"' EXIT

if ! command -v nginx >/dev/null || [ ! -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] ||
  [ ! -e /usr/lib/x86_64-linux-gnu/lua/5.1/cjson.so ]; then
  echo "peers.sh needs nginx-core, libnginx-mod-http-lua and lua-cjson: ./dev bench-deps" >&2
  exit 1
fi

# Both servers run for the whole benchmark, each on its own port, pinned to CPU 0.
MPHOST_PORT=$(free_port)
taskset -c 0 "$MPHOST" examples/server1.lua serve "$MPHOST_PORT" --listen=127.0.0.1 \
  --logging=warn --data="$WORK/data" >"$WORK/mphost.log" 2>&1 &
MPHOST_PID=$!
PIDS_TO_KILL+=("$MPHOST_PID")
NGINX_PORT=$(free_port)
mkdir -p "$WORK/nginx"
sed -e "s|@PORT@|$NGINX_PORT|" -e "s|@DIR@|$WORK/nginx|g" bench/peers/nginx.conf \
  >"$WORK/nginx/nginx.conf"
taskset -c 0 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS_TO_KILL+=("$NGINX_PID")
wait_port "$MPHOST_PORT"
wait_port "$NGINX_PORT"
sleep 0.3 # the supervisor's port accepts before its worker serves, nginx before its worker

# The processes that serve: mphost's worker (the supervisor only watches), nginx's worker.
MPHOST_WORKERS=$(tree "$MPHOST_PID" | tail -n +2 | paste -sd,)
NGINX_WORKERS=$(tree "$NGINX_PID" | tail -n +2 | paste -sd,)

BODY='{"jsonrpc":"2.0","id":1,"method":"simple-service","params":[{"hello":"world"}]}'
for p in "$MPHOST_PORT" "$NGINX_PORT"; do
  echo "$(curl -s -d "$BODY" "http://127.0.0.1:$p/")" >>"$WORK/answers"
done

echo "mphost $("$MPHOST" --version | cut -d' ' -f2) vs $(nginx -v 2>&1 | cut -d' ' -f3) +" \
  "lua-nginx-module $(dpkg-query -W -f='${Version}' libnginx-mod-http-lua) +" \
  "lua-cjson $(dpkg-query -W -f='${Version}' lua-cjson); $(nproc) cores, servers on CPU 0," \
  "wrk on CPU 1; median of $RUNS x ${DURATION}s, taken in turns"
echo "answers: $(paste -sd'|' "$WORK/answers")"
echo
echo "| server | connections | requests/s | p50 ms | p99 ms | CPU µs/request | syscalls/request |"
echo "|---|---|---|---|---|---|---|"
row() { # row NAME CONNS "rps p50 p99 n cpu sys"
  read -r rps p50 p99 _ cpu sys <<<"$3"
  printf '| %s | %s | %s | %.2f | %.2f | %s | %s |\n' "$1" "$2" "$rps" \
    "$(echo "$p50/1000" | bc -l)" "$(echo "$p99/1000" | bc -l)" "$cpu" "$sys"
}
for c in $CONNS; do
  mine=() theirs=()
  for _ in $(seq 1 "$RUNS"); do
    PORT=$MPHOST_PORT
    mine+=("$(measure_once "$c" bench/rpc.lua "$MPHOST_WORKERS")")
    PORT=$NGINX_PORT
    theirs+=("$(measure_once "$c" bench/rpc.lua "$NGINX_WORKERS")")
  done
  m=$(median_of "${mine[@]}")
  t=$(median_of "${theirs[@]}")
  row "mphost (server1, 1 worker)" "$c" "$m"
  row "nginx + Lua + cjson" "$c" "$t"
  echo "| **ratio mphost / peer** | $c | **$(echo "scale=2; ${m%% *} / ${t%% *}" | bc)** | | | | |"
done
