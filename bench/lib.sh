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
