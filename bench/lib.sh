# lib.sh: what the benchmark scripts share (sourced; bash). The server runs pinned to CPU 0,
# wrk to CPU 1; figures are the median of RUNS runs of DURATION seconds.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
  for _ in $(seq 1 500); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.02
  done
  echo "server did not start" >&2; exit 1
}

# wrk_median CONNS SCRIPT [ENV=VALUE...] -> "rps p50_us p99_us requests" of the median run
# (by requests/s) against $PORT, wrk on CPU 1 with the given environment.
wrk_median() {
  local conns=$1 script=$2 out=()
  shift 2
  for _ in $(seq 1 "$RUNS"); do
    out+=("$(env "$@" taskset -c 1 wrk -t1 -c"$conns" -d"${DURATION}"s -s "$script" \
      "http://127.0.0.1:$PORT/" | awk '/^RESULT/ { split($2,a,"="); split($3,b,"=");
        split($4,c,"="); split($5,d,"="); print a[2], b[2], c[2], d[2] }')")
  done
  printf '%s\n' "${out[@]}" | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p"
}

# cpu_ticks PID... -> user + system clock ticks used so far by these processes
cpu_ticks() {
  local t=0 p
  for p in "$@"; do
    t=$(( t + $(awk '{ print $14 + $15 }' "/proc/$p/stat") ))
  done
  echo "$t"
}

# tree PID -> PID and its children's pids
tree() {
  echo "$1"
  cat "/proc/$1/task/$1/children" 2>/dev/null | tr ' ' '\n' | sed '/^$/d'
}

# measure_once CONNS SCRIPT PIDS [ENV=VALUE...] -> "rps p50_us p99_us requests cpu_us syscalls"
# One wrk run against $PORT, with the CPU time (user + system, /proc) per request of the
# processes PIDS (comma-separated) and their system calls per request, counted by
# `perf stat -e raw_syscalls:sys_enter` over the run ("-" when perf cannot count them).
measure_once() {
  local conns=$1 script=$2 pids=$3 t0 t1 r sys="-"
  shift 3
  local list
  read -ra list <<<"${pids//,/ }"
  t0=$(cpu_ticks "${list[@]}")
  if perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
    perf stat -x, -e raw_syscalls:sys_enter -p "$pids" -o "$WORK/perf.out" -- sleep "$DURATION" \
      >/dev/null 2>&1 &
    local perf_pid=$!
  fi
  r=$(env "$@" taskset -c 1 wrk -t1 -c"$conns" -d"${DURATION}"s -s "$script" \
    "http://127.0.0.1:$PORT/" | awk '/^RESULT/ { split($2,a,"="); split($3,b,"=");
      split($4,c,"="); split($5,d,"="); print a[2], b[2], c[2], d[2] }')
  t1=$(cpu_ticks "${list[@]}")
  if [ -n "${perf_pid:-}" ]; then
    wait "$perf_pid" || true
    sys=$(awk -F, '/raw_syscalls/ { print $1 }' "$WORK/perf.out")
  fi
  read -r rps p50 p99 n <<<"$r"
  local hz
  hz=$(getconf CLK_TCK)
  printf '%s %s %s %s %s %s\n' "$rps" "$p50" "$p99" "$n" \
    "$(echo "scale=2; ($t1 - $t0) * 1000000 / $hz / $n" | bc)" \
    "$( [ "$sys" = "-" ] || [ -z "$sys" ] && echo - || echo "scale=2; $sys / $n" | bc)"
}

# median_of LINES... -> the line whose first field (requests/s) is the median
median_of() {
  printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"
}

# md_row LABEL CONNS "rps p50_us p99_us requests cpu_us syscalls" [COLUMNS] -> a Markdown
# table row: | LABEL | CONNS | rps | p50 ms | p99 ms | then COLUMNS: "cpu" (the default),
# "cpu syscalls", or "-" (a dash where the CPU would be: not measured).
md_row() {
  local rps p50 p99 cpu sys
  read -r rps p50 p99 _ cpu sys <<<"$3"
  local extra
  case "${4:-cpu}" in
    cpu) extra="$cpu" ;;
    "cpu syscalls") extra="$cpu | ${sys:--}" ;;
    *) extra="-" ;;
  esac
  printf '| %s | %s | %s | %.2f | %.2f | %s |\n' "$1" "$2" "$rps" \
    "$(echo "$p50/1000" | bc -l)" "$(echo "$p99/1000" | bc -l)" "$extra"
}

# bench_init [BUILD_DIR]: what every script sets up first: MPHOST from the build
# (build-release by default), a scratch WORK directory, and on exit every pid in PIDS_TO_KILL
# killed and WORK removed (after the last lines of $WORK/server.log when the script failed).
bench_init() {
  BUILD=${1:-build-release}
  MPHOST=$PWD/$BUILD/mphost
  WORK=$(mktemp -d)
  PIDS_TO_KILL=()
  SERVERS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local rc=$?
  [ "$rc" -ne 0 ] && [ -f "$WORK/server.log" ] && tail -n 5 "$WORK/server.log" >&2
  [ ${#PIDS_TO_KILL[@]} -gt 0 ] && kill "${PIDS_TO_KILL[@]}" 2>/dev/null
  wait 2>/dev/null # (redis-server may still write into $WORK while it exits)
  rm -rf "$WORK"
}

# start_server SCRIPT DATA ARGS...: one `mphost SCRIPT serve` on CPU 0 with its data in DATA,
# logging to $WORK/server.log; sets PORT, appends its pid to SERVERS; returns once it serves.
start_server() {
  local script=$1 data=$2
  shift 2
  PORT=$(free_port)
  taskset -c 0 "$MPHOST" "$script" serve "$PORT" --listen=127.0.0.1 --logging=warn \
    --data="$data" "$@" >>"$WORK/server.log" 2>&1 &
  SERVERS+=($!)
  PIDS_TO_KILL+=($!)
  wait_port "$PORT"
  sleep 0.3 # a supervisor's port accepts before every worker serves
}

# stop_servers: stops every server start_server started, and waits for each.
stop_servers() {
  local p
  for p in "${SERVERS[@]}"; do kill -TERM "$p"; wait "$p" || true; done
  SERVERS=()
}

# start_redis: a redis-server without persistence on CPU 1; sets REDIS_PORT and REDIS (the
# --storage option for it).
start_redis() {
  REDIS_PORT=$(free_port)
  taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --dir "$WORK" \
    >"$WORK/redis.log" 2>&1 &
  PIDS_TO_KILL+=($!)
  wait_port "$REDIS_PORT"
  REDIS=--storage=redis://127.0.0.1:$REDIS_PORT
}
