# What bench/cpu_check.sh and bench/api_check.sh share, sourced after they set OUT: strict mode,
# the output folder, the venv's Python and the redbatch CLI, free-ish ports, a private redis-server
# (PID in RPID, URL exported), waiting for the API to be ready, the CPU each process group used per
# request over a load's window, and a trap that stops every process whose PID is in the pids array.
set -uo pipefail
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-.venv/bin/python}
RB="$PY -m common.cli"
# Below Linux's ephemeral ports (32768 up): the load's own client connections cannot take them first.
PORT=$((20000 + RANDOM % 6000)) HTTP=$((26000 + RANDOM % 6000))
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

wait_ready() {  # seconds: until the API on $HTTP answers /readyz (a live worker registered), or give up
  for _ in $(seq 1 $(($1 * 2))); do
    curl -sf "http://127.0.0.1:$HTTP/readyz" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

start_redis() {
  redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no >"$OUT/redis.log" 2>&1 &
  RPID=$!
  pids+=("$RPID")
  export REDBATCH_REDIS_URL=redis://127.0.0.1:$PORT/0 REDBATCH_MAX_QUEUE_LENGTH=4096
}

cpu_window() {  # name seconds bench-pid bench-json group...: snapshots the groups' CPU over the next
  # `seconds` (bench/proc_cpu.py), waits for the bench, and sets RPS (its req/s) and CPU_SPLIT (CPU ms
  # per request by group, over the requests of that window)
  local name=$1 seconds=$2 bpid=$3 json=$4 t0 t1
  shift 4
  $PY bench/proc_cpu.py snap "$OUT/$name-cpu0.json" "$@"
  t0=$(date +%s.%N)
  sleep "$seconds"
  $PY bench/proc_cpu.py snap "$OUT/$name-cpu1.json" "$@"
  t1=$(date +%s.%N)
  wait "$bpid"
  RPS=$($PY -c "import json; print(round(json.load(open('$json'))['levels'][0]['ok_per_s'], 1))")
  CPU_SPLIT=$($PY bench/proc_cpu.py diff "$OUT/$name-cpu0.json" "$OUT/$name-cpu1.json" \
    "$($PY -c "print(int($RPS * ($t1 - $t0)))")")
}
