#!/usr/bin/env bash
# The GPU check (issue 5): resnet50 float16 channels_last on one NVIDIA GPU with 16 CPU cores, in
# under 6 minutes. Measures the model's in-process limit, then the served throughput through the
# real stack (gunicorn API processes on the CPU cores -> Redis -> one worker on the GPU) at 64 and
# 256 clients, with preprocessing in the API and with JPEG decoding batched on the GPU, the latter
# also with --cuda-graphs (one graph per batch bucket); the in-process limit with and without graphs.
#
# On a GPU machine that has torch but not the rest, first (here):  bash ../shared/tools/device-kit.sh
# then there, from the repo root:                                  bash bench/gpu_check.sh
# Results go to $OUT (or ./out). A dry run on a CPU machine:
#   DEVICE=cpu MODEL=mobilenet_v3_small DTYPE=float32 CLIENTS="8" SECONDS_PER_LEVEL=3 API_WORKERS=1 bash bench/gpu_check.sh
# Knobs: MODES="api worker" (empty: neither, only the graph run), GRAPHS=1 (the graph runs too), CLIENTS="64 256", BENCH_PROCS=2 (client processes), API_WORKERS=10,
# SKIP_INPROC=1, PROFILE=1 (py-spy raw stacks of the worker and one API process, if py-spy is there),
# REDIS_ARGS="--io-threads 4" (more redis-server options), INSTANCES=3 (a run with --instances N,
# N worker processes on the one GPU, with --cuda-graphs when GRAPHS=1; 0 or 1: no such run).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
[ -f .device-kit/activate.sh ] && source .device-kit/activate.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::DeprecationWarning
PY=${PYTHON:-python3}
RB="$PY -m common.cli"
MODEL=${MODEL:-resnet50} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-float16}
CLIENTS=${CLIENTS:-"64 256"} SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-10} GRAPHS=${GRAPHS:-1}
API_WORKERS=${API_WORKERS:-10} MAX_BATCH=${MAX_BATCH:-128} BENCH_PROCS=${BENCH_PROCS:-2}
# below Linux's ephemeral range (32768-60999): a port there may be held by a client's old connection
PORT=$((20000 + RANDOM % 6000)) HTTP=$((26000 + RANDOM % 6000))
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

{
  echo "date: $(date -u +%FT%TZ)"; nproc | sed 's/^/cpu cores: /'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys,torch,torchvision,PIL; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

: >"$OUT/summary.txt"
inproc() {  # name [extra flags]
  echo "== in-process limit: $MODEL $DTYPE channels_last on $DEVICE ${2:-}" | tee -a "$OUT/summary.txt"
  # shellcheck disable=SC2086
  timeout 150 $RB bench --in-process --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --channels-last ${2:-} \
    --batch-sizes "${BATCH_SIZES:-1,8,32,64,128,256}" --duration-s "${INPROC_S:-1.5}" --json "$OUT/$1.json" \
    2>&1 | tee -a "$OUT/summary.txt"
}
if [ -z "${SKIP_INPROC:-}" ]; then
  inproc inprocess
  [ "$GRAPHS" = 1 ] && inproc inprocess-graphs --cuda-graphs
fi

# shellcheck disable=SC2086
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no ${REDIS_ARGS:-} >"$OUT/redis.log" 2>&1 &
RPID=$!
pids+=("$RPID")
export REDBATCH_REDIS_URL=redis://127.0.0.1:$PORT/0 REDBATCH_REQUEST_TIMEOUT_S=30 REDBATCH_MAX_QUEUE_LENGTH=4096

served() {  # preprocess mode (api | worker), [name, extra worker flags, worker processes]
  local prep=$1 mode=${2:-$1} extra=${3:-} procs=${4:-1} prefix="gpu${2:-$1}"
  # shellcheck disable=SC2086
  REDBATCH_PREFIX=$prefix $RB worker --model "$MODEL" --weights random --device "$DEVICE" --dtype "$DTYPE" \
    --max-batch-size "$MAX_BATCH" --window-ms 2 --preprocess "$prep" $extra >"$OUT/worker-$mode.log" 2>&1 &
  local wpid=$!
  REDBATCH_PREFIX=$prefix $RB api --bind "127.0.0.1:$HTTP" --workers "$API_WORKERS" --threads 64 \
    >"$OUT/api-$mode.log" 2>&1 &
  local apid=$!
  pids+=("$wpid" "$apid")
  for _ in $(seq 1 300); do
    $PY -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:$HTTP/readyz').status != 200)" 2>/dev/null && break
    if ! kill -0 "$wpid" 2>/dev/null; then  # the worker refused its options or failed to start
      echo "== worker $mode exited: $(tail -1 "$OUT/worker-$mode.log")" | tee -a "$OUT/summary.txt"
      kill "$apid"; wait "$apid" 2>/dev/null
      return
    fi
    sleep 0.5
  done
  for _ in $(seq 1 240); do  # every instance registered (the API is ready with the first)
    [ "$(redis-cli -p "$PORT" --scan --pattern "$prefix:worker:*" | wc -l)" -ge "$procs" ] && break
    sleep 0.5
  done
  local wpids="$wpid"
  [ "$procs" -gt 1 ] && wpids="$wpid,$(pgrep -P "$wpid" | paste -sd,)"
  for c in $CLIENTS; do
    echo "== served, preprocess=$mode, $c clients in $BENCH_PROCS client processes" | tee -a "$OUT/summary.txt"
    local per=$((c / BENCH_PROCS)) bp=()
    for i in $(seq 1 "$BENCH_PROCS"); do
      $RB bench --url "http://127.0.0.1:$HTTP" --model "$MODEL" --concurrency "$per" --duration-s "$SECONDS_PER_LEVEL" \
        --warmup-s 3 --json "$OUT/served-$mode-$c-$i.json" >"$OUT/served-$mode-$c-$i.txt" 2>&1 &
      bp+=($!)
    done
    # mid-run: the cores each process group keeps busy, the GPU's busy share (nvidia-smi: the time
    # some kernel ran) and, with PROFILE=1, py-spy stacks of the worker and one API process
    sleep 4
    local span=$((SECONDS_PER_LEVEL - 3)) groups=("api=$apid,$(pgrep -P "$apid" | paste -sd,)" "worker=$wpids" "redis=$RPID"
      "bench=$(IFS=,; echo "${bp[*]}")")
    $PY bench/proc_cpu.py snap "$OUT/cpu0.json" "${groups[@]}"
    local smi=""
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 250 >"$OUT/gpu-util-$mode-$c.txt" 2>/dev/null &
      smi=$!
    fi
    if [ -n "${PROFILE:-}" ] && command -v py-spy >/dev/null; then
      py-spy record -d "$span" -r 40 --nonblocking --format raw -o "$OUT/prof-worker-$mode-$c.txt" --pid "${wpids##*,}" >/dev/null 2>&1 &
      py-spy record -d "$span" -r 40 --nonblocking --format raw -o "$OUT/prof-api-$mode-$c.txt" \
        --pid "$(pgrep -P "$apid" | head -1)" >/dev/null 2>&1 &
    fi
    sleep "$span"
    $PY bench/proc_cpu.py snap "$OUT/cpu1.json" "${groups[@]}"
    [ -n "$smi" ] && kill "$smi"
    wait "${bp[@]}"
    cat "$OUT"/served-"$mode"-"$c"-*.txt | tee -a "$OUT/summary.txt"
    $PY bench/proc_cpu.py cores "$OUT/cpu0.json" "$OUT/cpu1.json" "$span" | tee -a "$OUT/summary.txt"
    [ -s "$OUT/gpu-util-$mode-$c.txt" ] && sort -n "$OUT/gpu-util-$mode-$c.txt" |
      awk '{v[NR]=$1} END {printf "GPU busy %% (nvidia-smi, %d samples): median %s, min %s\n", NR, v[int((NR+1)/2)], v[1]}' |
      tee -a "$OUT/summary.txt"
  done
  redis-cli -p "$PORT" hgetall "$prefix:stats:$MODEL" | paste - - | tee -a "$OUT/summary.txt"
  kill "$apid" "$wpid"; wait "$apid" "$wpid" 2>/dev/null
}

for mode in ${MODES-api worker}; do served "$mode"; done
[ "$GRAPHS" = 1 ] && served worker worker-graphs --cuda-graphs
INSTANCES=${INSTANCES:-3}
if [ "$INSTANCES" -gt 1 ]; then
  graphs=""; [ "$GRAPHS" = 1 ] && graphs=" --cuda-graphs"
  served worker "worker-x$INSTANCES${graphs:+-graphs}" "--instances $INSTANCES$graphs" "$INSTANCES"
fi
echo "== done" | tee -a "$OUT/summary.txt"
