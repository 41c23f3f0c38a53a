#!/usr/bin/env bash
# cluster.sh: Redis at scale (issue 12), with wrk and bench/transfer.lua against the real
# binary (--workers=0: one process) serving bench/bank.lua. The server runs on CPU 0, wrk and
# every redis-server on CPU 1; each figure is the median of RUNS runs of DURATION seconds.
#
#   bench/cluster.sh [BUILD_DIR]    env: DURATION (3), RUNS (3), CONNS (64), SCOPES (10000)
#
# Rows:
#  - a counter over SCOPES named scopes on one Redis node, then on a 3-master Redis Cluster
#    (redis-cli --cluster create): calls/s, latency, Redis commands per call (all nodes'
#    total_commands_processed over the calls answered), and the per-node spread of commands;
#  - a counter on one hot named scope on a master with one replica, without and with
#    --redis-wait=1: the cost of WAIT, and WAITs per call (group commit should make it well
#    under one).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
BUILD=${1:-build-release}
MPHOST=$PWD/$BUILD/mphost
DURATION=${DURATION:-3}
RUNS=${RUNS:-3}
CONNS=${CONNS:-64}
SCOPES=${SCOPES:-10000}
WORK=$(mktemp -d)
SERVER_PID=""
REDIS_PIDS=()
trap '[ -n "$SERVER_PID" ] && kill $SERVER_PID 2>/dev/null; for p in "${REDIS_PIDS[@]}"; do kill $p 2>/dev/null; done; rm -rf "$WORK"' EXIT

# A free port whose cluster bus port (+10000) is free too.
cluster_port() {
  python3 -c 'import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p + 10000 > 65535: continue
    t = socket.socket()
    try: t.bind(("127.0.0.1", p + 10000)); t.close(); print(p); break
    except OSError: t.close()'
}

redis() { # redis PORT ARGS...: a redis-server on CPU 1 in its own directory
  local port=$1; shift
  mkdir -p "$WORK/r$port"
  taskset -c 1 redis-server --port "$port" --bind 127.0.0.1 --save "" --dir "$WORK/r$port" \
    "$@" >"$WORK/r$port/log" 2>&1 &
  REDIS_PIDS+=($!)
  wait_port "$port"
}

start() { # start LOG ARGS...: mphost on CPU 0 serving bench/bank.lua on a free $PORT
  local log=$1; shift
  PORT=$(free_port)
  taskset -c 0 env MPH_BENCH=1 "$MPHOST" bench/bank.lua serve "$PORT" --listen=127.0.0.1 \
    --workers=0 --logging=info "$@" >"$WORK/$log.log" 2>&1 &
  SERVER_PID=$!
  wait_port "$PORT"
}

# Round trips a node served: the storage scripts (loads and commits) and WAITs that clients sent.
# (total_commands_processed also counts every command a script runs inside Redis.)
round_trips() { # round_trips PORT
  echo $(( $(stat "$1" cmdstat_evalsha) + $(stat "$1" cmdstat_eval) + $(stat "$1" cmdstat_wait) ))
}

stop() { kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=""; }

stat() { # stat PORT FIELD -> an INFO field of the node (commandstats: cmdstat_NAME calls)
  case $2 in
    cmdstat_*) redis-cli -p "$1" INFO commandstats | tr -d '\r' |
      sed -n "s/^$2:calls=\([0-9]*\),.*/\1/p" | grep . || echo 0 ;;
    *) redis-cli -p "$1" INFO | tr -d '\r' | sed -n "s/^$2:\([0-9]*\)/\1/p" ;;
  esac
}

# run NAME SCOPES PORTS... -> one table row: the counter over SCOPES scopes against the
# running server, with every node's commands counted over the measured runs.
run() {
  local name=$1 n=$2; shift 2
  local before=() after=() total=0 spread="" rps p50 p99 calls rt0=0 rt1=0
  for p in "$@"; do
    before+=("$(stat "$p" total_commands_processed)"); rt0=$(( rt0 + $(round_trips "$p") ))
  done
  read -r rps p50 p99 calls <<<"$(wrk_median "$CONNS" bench/transfer.lua MODE=count \
    ACCOUNTS="$n")"
  local i=0
  for p in "$@"; do
    after[i]=$(( $(stat "$p" total_commands_processed) - before[i] ))
    total=$(( total + after[i] )); i=$(( i + 1 ))
    rt1=$(( rt1 + $(round_trips "$p") ))
  done
  for c in "${after[@]}"; do spread+="$(( 100 * c / (total ? total : 1) ))% "; done
  # wrk_median reports the median run's calls; the nodes counted all RUNS runs.
  printf '| %s | %s | %.2f | %.2f | %.2f | %.2f | %s|\n' "$name" "$rps" \
    "$(echo "$p50/1000" | bc -l)" "$(echo "$p99/1000" | bc -l)" \
    "$(echo "($rt1 - $rt0) / ($calls * $RUNS)" | bc -l)" "$(echo "$total / ($calls * $RUNS)" | bc -l)" \
    "$spread"
}

echo "mphost $("$MPHOST" --version | cut -d' ' -f2), $(nproc) cores, server on CPU 0, wrk and" \
  "redis-server on CPU 1, $CONNS connections, median of $RUNS x ${DURATION}s"
echo "(per call: over all runs, approximated by the median run's calls x RUNS; round trips are"
echo " the storage scripts and WAITs mphost sent, commands also count those the scripts ran)"
echo
echo "| workload | calls/s | p50 ms | p99 ms | round trips per call | Redis commands per call | per-node share of commands |"
echo "|---|---|---|---|---|---|---|"

# One node.
ONE=$(free_port)
redis "$ONE"
start one --storage="redis://127.0.0.1:$ONE"
run "counter over $SCOPES scopes, one Redis node" "$SCOPES" "$ONE"
stop

# A 3-master cluster.
NODES=()
for _ in 1 2 3; do
  p=$(cluster_port); NODES+=("$p")
  redis "$p" --cluster-enabled yes --cluster-node-timeout 5000
done
ADDRS=()
for p in "${NODES[@]}"; do ADDRS+=("127.0.0.1:$p"); done
redis-cli --cluster create "${ADDRS[@]}" --cluster-yes >/dev/null
for p in "${NODES[@]}"; do
  for _ in $(seq 1 500); do
    redis-cli -p "$p" CLUSTER INFO | grep -q cluster_state:ok && break
    sleep 0.02
  done
done
start cluster --storage="redis://127.0.0.1:${NODES[0]}"
run "counter over $SCOPES scopes, 3-master cluster" "$SCOPES" "${NODES[@]}"
stop

# WAIT on a hot scope: a master and one replica.
MASTER=$(free_port) REPLICA=$(free_port)
redis "$MASTER"
redis "$REPLICA" --replicaof 127.0.0.1 "$MASTER" --repl-diskless-sync-delay 0
for _ in $(seq 1 500); do
  [ "$(printf 'SET mph:probe 1\nWAIT 1 200\n' | redis-cli -p "$MASTER" | tail -n 1)" = 1 ] && break
  sleep 0.02
done
echo
echo "| hot scope (1 named scope), master + 1 replica | calls/s | p50 ms | p99 ms | round trips per call | Redis commands per call | WAITs per call |"
echo "|---|---|---|---|---|---|---|"
for wait in "" 1; do
  # shellcheck disable=SC2086 # no WAIT: no option at all
  start "wait$wait" --storage="redis://127.0.0.1:$MASTER" ${wait:+--redis-wait=$wait}
  w0=$(stat "$MASTER" cmdstat_wait)
  row=$(run "x" 1 "$MASTER")
  w=$(( $(stat "$MASTER" cmdstat_wait) - w0 ))
  stop
  calls=$(sed -n 's/.*transactions: \([0-9]*\) calls.*/\1/p' "$WORK/wait$wait.log" | tail -n 1)
  label="no WAIT"; [ -n "$wait" ] && label="--redis-wait=$wait"
  echo "$row" | sed "s/^| x |/| $label |/; s/| [0-9]*% |$/| $(echo "$w / ${calls:-1}" | bc -l | cut -c1-5) |/"
done
