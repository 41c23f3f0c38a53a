#!/usr/bin/env bash
# outbox.sh: messages of mp.send delivered per second to mp.self, on file storage and on Redis.
# N messages (bench/outbox.lua's "seed", 500 per call) are all sent due at one moment a few
# seconds ahead, so that sending is over before delivery starts; from that moment the count
# their handler keeps is polled every 20 ms until it reaches N. Each delivery is a transaction
# of its own (the handler's write and the message's removal in one commit), behind claims that
# lease up to 64 messages at a time. Prints messages/s (N / the time from due to the last
# delivered), for WORKERS workers, median of RUNS runs.
#
#   bench/outbox.sh [BUILD_DIR]      env: N (5000), RUNS (3), WORKERS ("1 2")
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_init "${1:-}"
N=${N:-5000}
RUNS=${RUNS:-3}
WORKERS=${WORKERS:-"1 2"}

call() { # call PORT METHOD PARAMS -> the result
  curl -s -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"$2\",\"params\":$3}" \
    "http://127.0.0.1:$1/" | python3 -c 'import json,sys; print(json.load(sys.stdin)["result"])'
}

# one_run STORAGE_ARGS WORKERS -> messages/s
one_run() {
  local port data at t_end
  port=$(free_port)
  data=$(mktemp -d -p "$WORK")
  "$MPHOST" bench/outbox.lua serve "$port" --listen=127.0.0.1 --logging=warn \
    --data="$data" --workers="$2" $1 >"$WORK/mphost.log" 2>&1 &
  local pid=$!
  wait_port "$port"
  sleep 0.3
  at=$(python3 -c 'import time; print(int(time.time()) + 4)')
  for _ in $(seq 1 $((N / 500))); do call "$port" seed "[500, $at]" >/dev/null; done
  while [ "$(call "$port" done '[]')" -lt "$N" ]; do sleep 0.02; done
  t_end=$(python3 -c 'import time; print(time.time())')
  kill "$pid"
  wait "$pid" || true
  python3 -c "print(int($N / ($t_end - $at)))"
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK" --save "" --appendonly yes \
  --appendfsync always --daemonize no --logfile "$WORK/redis.log" &
PIDS_TO_KILL+=("$!")
wait_port "$REDIS_PORT"

echo "mphost $("$MPHOST" --version | cut -d' ' -f2); $(nproc) cores; $N messages due at once," \
  "median of $RUNS runs; Redis with appendfsync always"
echo
echo "| storage | workers | messages/s |"
echo "|---|---|---|"
for w in $WORKERS; do
  for storage in file redis; do
    args=""
    [ "$storage" = redis ] && args="--storage=redis://127.0.0.1:$REDIS_PORT"
    runs=()
    for _ in $(seq 1 "$RUNS"); do
      [ "$storage" = redis ] && redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
      runs+=("$(one_run "$args" "$w")")
    done
    printf '| %s | %s | %s |\n' "$storage" "$w" \
      "$(printf '%s\n' "${runs[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p")"
  done
done
