#!/usr/bin/env bash
# peers.sh: mphost against the OpenResty-style peer (nginx with Debian's Lua module and
# lua-cjson, bench/peers/nginx.conf, one worker) on server1's echo call, in the same run, for
# each workload: single calls at 16 and 64 connections, batches of 10 calls, 4 KiB params,
# 1,000 connections, and "Connection: close" on every request. The same requests
# (bench/rpc.lua) to both, each server pinned to CPU 0 and wrk to CPU 1, the two servers
# measured in turn for each of RUNS rounds. Prints requests/s, latency, CPU time and system
# calls per request of each, and the ratios of the medians (CPU per request is the figure
# noise moves least).
#
#   bench/peers.sh [BUILD_DIR]      env: DURATION (3), RUNS (5), WORKLOADS (all of them:
#                                   "NAME|CONNECTIONS|VARS;...", VARS as bench/rpc.lua reads)
#
# Needs nginx-core, libnginx-mod-http-lua and lua-cjson (`./dev bench-deps`).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init "${1:-}"
DURATION=${DURATION:-3}
RUNS=${RUNS:-5}
# Each workload: "NAME|CONNECTIONS|VARIABLES for bench/rpc.lua".
if [ -n "${WORKLOADS:-}" ]; then
  IFS=';' read -ra WORKLOADS <<<"$WORKLOADS"
else
  WORKLOADS=("echo|16|" "echo|64|" "batch of 10 calls|64|BATCH=10" "4 KiB params|64|PAD=4096"
    "1,000 connections|1000|" "Connection: close|64|CLOSE=1")
fi

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
echo "| workload | server | connections | requests/s | p50 ms | p99 ms | CPU µs/request | syscalls/request |"
echo "|---|---|---|---|---|---|---|---|"
# ratio A B -> A / B to two places, or - when either is not a number
ratio() { if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]]; then echo "scale=2; $1 / $2" | bc; else echo -; fi; }
for w in "${WORKLOADS[@]}"; do
  IFS='|' read -r name c envs <<<"$w"
  read -ra env_list <<<"$envs"
  mine=() theirs=()
  for _ in $(seq 1 "$RUNS"); do
    PORT=$MPHOST_PORT
    mine+=("$(measure_once "$c" bench/rpc.lua "$MPHOST_WORKERS" "${env_list[@]}")")
    PORT=$NGINX_PORT
    theirs+=("$(measure_once "$c" bench/rpc.lua "$NGINX_WORKERS" "${env_list[@]}")")
  done
  m=$(median_of "${mine[@]}")
  t=$(median_of "${theirs[@]}")
  md_row "$name | mphost (server1, 1 worker)" "$c" "$m" "cpu syscalls"
  md_row "$name | nginx + Lua + cjson" "$c" "$t" "cpu syscalls"
  read -r mrps _ _ _ mcpu msys <<<"$m"
  read -r trps _ _ _ tcpu tsys <<<"$t"
  echo "| $name | **mphost / peer** | $c | **$(ratio "$mrps" "$trps")** | | |" \
    "**$(ratio "$mcpu" "$tcpu")** | $(ratio "$msys" "$tsys") |"
done
