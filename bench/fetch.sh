#!/usr/bin/env bash
# fetch.sh: what one outbound call (mp.fetch) adds to a call. Three measurements of the same
# JSON-RPC echo call (bench/rpc.lua), in turns, each round: wrk straight to a local echo
# endpoint; mphost's "plain" service (bench/fetch.lua: answers at once); and its "fetched"
# service, which first sends the echo call to that endpoint with mp.fetch. Prints
# requests/s, latency and the mphost worker's CPU time per request of each, the ratio of
# fetched to plain calls per second and the latency fetched adds to a plain call, medians of
# RUNS runs.
#
#   bench/fetch.sh [BUILD_DIR]      env: DURATION (3), RUNS (5), CONNS ("16 64"),
#                                   ECHO (nginx when installed, else mphost)
#
# The echo endpoint: ECHO=nginx is bench/peers/nginx.conf (nginx with Debian's Lua module and
# lua-cjson, one worker: `./dev bench-deps`); ECHO=mphost is a second mphost serving
# examples/server1.lua. mphost under test runs on CPU 0, wrk on CPU 1, the endpoint on CPU 2
# (CPU 1, beside wrk, on a machine of two).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init "${1:-}"
DURATION=${DURATION:-3}
RUNS=${RUNS:-5}
CONNS=${CONNS:-"16 64"}
if [ -z "${ECHO:-}" ]; then
  if command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ]; then
    ECHO=nginx
  else
    ECHO=mphost
  fi
fi
ECHO_CPU=$(( $(nproc) > 2 ? 2 : 1 ))

# The echo endpoint.
ECHO_PORT=$(free_port)
case "$ECHO" in
  nginx)
    mkdir -p "$WORK/nginx"
    sed -e "s|@PORT@|$ECHO_PORT|" -e "s|@DIR@|$WORK/nginx|g" bench/peers/nginx.conf \
      >"$WORK/nginx/nginx.conf"
    taskset -c "$ECHO_CPU" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" \
      >"$WORK/echo.log" 2>&1 &
    ;;
  mphost)
    taskset -c "$ECHO_CPU" "$MPHOST" examples/server1.lua serve "$ECHO_PORT" \
      --listen=127.0.0.1 --logging=warn --data="$WORK/echo-data" >"$WORK/echo.log" 2>&1 &
    ;;
  *) echo "ECHO must be nginx or mphost" >&2; exit 1 ;;
esac
PIDS_TO_KILL+=("$!")

# mphost under test, one worker.
PORT=$(free_port)
ECHO_URL="http://127.0.0.1:$ECHO_PORT/" taskset -c 0 "$MPHOST" bench/fetch.lua serve "$PORT" \
  --listen=127.0.0.1 --logging=warn --data="$WORK/data" >"$WORK/mphost.log" 2>&1 &
MPHOST_PID=$!
PIDS_TO_KILL+=("$MPHOST_PID")
MPHOST_PORT=$PORT
wait_port "$ECHO_PORT"
wait_port "$MPHOST_PORT"
sleep 0.3 # the ports accept before the workers serve
WORKER=$(tree "$MPHOST_PID" | tail -n +2 | paste -sd,)

BODY='{"jsonrpc":"2.0","id":1,"method":"%s","params":[{"hello":"world"}]}'
for m in plain fetched; do
  # shellcheck disable=SC2059
  answer=$(curl -s -d "$(printf "$BODY" "$m")" "http://127.0.0.1:$MPHOST_PORT/")
  case "$answer" in *'"result"'*) ;; *) echo "$m answered: $answer" >&2; exit 1 ;; esac
done

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), libcurl $(curl-config --version | cut -d' ' -f2)," \
  "echo endpoint: $ECHO; $(nproc) cores: mphost on CPU 0, wrk on CPU 1, endpoint on CPU" \
  "$ECHO_CPU; median of $RUNS x ${DURATION}s, taken in turns"
echo
echo "| call | connections | requests/s | p50 ms | p99 ms | mphost CPU µs/request |"
echo "|---|---|---|---|---|---|"
for c in $CONNS; do
  direct=() plain=() fetched=()
  for _ in $(seq 1 "$RUNS"); do
    PORT=$ECHO_PORT
    direct+=("$(measure_once "$c" bench/rpc.lua "$WORKER")")
    PORT=$MPHOST_PORT
    plain+=("$(measure_once "$c" bench/rpc.lua "$WORKER" METHOD=plain)")
    fetched+=("$(measure_once "$c" bench/rpc.lua "$WORKER" METHOD=fetched)")
  done
  d=$(median_of "${direct[@]}")
  p=$(median_of "${plain[@]}")
  f=$(median_of "${fetched[@]}")
  md_row "wrk -> $ECHO echo, direct" "$c" "$d" -
  md_row "wrk -> mphost plain" "$c" "$p"
  md_row "wrk -> mphost fetched (-> $ECHO echo)" "$c" "$f"
  read -r prps pp50 _ <<<"$p"
  read -r frps fp50 _ <<<"$f"
  read -r drps _ <<<"$d"
  printf '| **fetched / plain** | %s | **%.2f** | +%.2f | | |\n' "$c" \
    "$(echo "$frps / $prps" | bc -l)" "$(echo "($fp50 - $pp50) / 1000" | bc -l)"
  printf '| **fetched / direct** | %s | **%.2f** | | | |\n' "$c" "$(echo "$frps / $drps" | bc -l)"
done
