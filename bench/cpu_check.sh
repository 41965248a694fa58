#!/usr/bin/env bash
# The CPU check (issue 5) on a small CPU machine: every CPU target of docs/benchmarks.md, measured
# side by side and repeated, because a shared machine's speed drifts from minute to minute. Each
# repeat times the model's own limit in-process and then the served figures through the real stack
# (bench clients -> gunicorn API -> Redis -> one worker with torch's default threads), so every
# ratio comes from one stretch of time (the model's limit is timed both before and after its main
# served run, and the mean is the limit); bench/cpu_summary.py prints each repeat's ratios and
# their medians. Served runs use --preprocess worker (the fastest on a CPU) unless named "-api".
#
#   bash bench/cpu_check.sh            # from the repo root, with the venv of scripts/test.sh
# Results go to $OUT (default out/cpu). Knobs: REPEATS=3, SECONDS_PER_LEVEL=10, API_WORKERS=1,
# MODELS="mobilenet_v3_small resnet18", BF16=1 (resnet18 in bfloat16 too), PYTHON=.venv/bin/python,
# DRIFT_S=10 (seconds of bench/host_check.py's drift loop in machine.txt; 0: none).
OUT=${OUT:-out/cpu}
source bench/env.sh
REPEATS=${REPEATS:-3} SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-10} WARMUP_S=3 API_WORKERS=${API_WORKERS:-1}
MODELS=${MODELS:-"mobilenet_v3_small resnet18"} BF16=${BF16:-1}
WINDOW_S=$((SECONDS_PER_LEVEL - 2))  # each load's CPU window (bench/cpu_summary.py's snapshot_window)
if [ "$WINDOW_S" -lt 2 ]; then
  echo "SECONDS_PER_LEVEL must be at least 4: the CPU of each load is taken over its length less 2 s" >&2
  exit 2
fi

{
  echo "date: $(date -u +%FT%TZ)"; nproc | sed 's/^/cpu cores: /'
  $PY bench/host_check.py --drift-s "${DRIFT_S:-10}"  # the CPU's generation, nesting, drift, wake-ups
  $PY -c "import sys,torch,torchvision,PIL; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'pillow', PIL.__version__, 'cpu capability', torch.backends.cpu.get_cpu_capability())"
} 2>&1 | tee "$OUT/machine.txt"

start_redis
export REDBATCH_REQUEST_TIMEOUT_S=60

inproc() {  # name model dtype batch-sizes
  timeout 300 $RB bench --in-process --model "$2" --device cpu --dtype "$3" --batch-sizes "$4" \
    --duration-s 1.5 --json "$OUT/$1.json" >"$OUT/$1.txt" 2>&1
  tail -2 "$OUT/$1.txt"
}

served() {  # name model max-batch dtype preprocess "concurrencies" [worker flags]; CPU per process group at each level
  local name=$1 model=$2 n=$3 dtype=$4 prep=$5 levels=$6 extra=${7:-} prefix="cpu$RANDOM"
  # shellcheck disable=SC2086
  REDBATCH_PREFIX=$prefix $RB worker --model "$model" --weights random --device cpu --dtype "$dtype" \
    --max-batch-size "$n" --preprocess "$prep" $extra >"$OUT/$name-worker.log" 2>&1 &
  local wpid=$!
  REDBATCH_PREFIX=$prefix $RB api --bind "127.0.0.1:$HTTP" --workers "$API_WORKERS" --threads 64 >"$OUT/$name-api.log" 2>&1 &
  local apid=$!
  pids+=("$wpid" "$apid")
  wait_ready 120
  for c in $levels; do
    $RB bench --url "http://127.0.0.1:$HTTP" --model "$model" --concurrency "$c" --duration-s "$SECONDS_PER_LEVEL" \
      --warmup-s "$WARMUP_S" --json "$OUT/$name-c$c.json" >"$OUT/$name-c$c.txt" 2>&1 &
    local bpid=$!
    sleep $((WARMUP_S + 1))
    local groups=("api=$apid,$(pgrep -P "$apid" | paste -sd,)" "worker=$wpid" "redis=$RPID" "bench=$bpid")
    $PY bench/proc_cpu.py snap "$OUT/$name-c$c-cpu0.json" "${groups[@]}"
    redis-cli -p "$PORT" HGETALL "$prefix:stats:$model" >"$OUT/$name-c$c-stats0.txt"  # the worker's own CPU counters
    sleep "$WINDOW_S"
    $PY bench/proc_cpu.py snap "$OUT/$name-c$c-cpu1.json" "${groups[@]}"
    redis-cli -p "$PORT" HGETALL "$prefix:stats:$model" >"$OUT/$name-c$c-stats1.txt"
    wait "$bpid"
    grep -E '^ +[0-9]' "$OUT/$name-c$c.txt" | sed "s/^/$name  /"
  done
  kill "$apid" "$wpid"; wait "$apid" "$wpid" 2>/dev/null
}

for r in $(seq 1 "$REPEATS"); do
  echo "== repeat $r"
  for m in $MODELS; do
    case $m in
      resnet18) n=8 sizes=1,2,4,8,16 ;;
      *) n=32 sizes=1,4,8,16,32 ;;
    esac
    inproc "r$r-$m-float32-inproc" "$m" float32 "$sizes"
    served "r$r-$m-float32-n$n-worker" "$m" "$n" float32 worker "1 64"
    inproc "r$r-$m-float32-inproc-after" "$m" float32 "$sizes"  # the limit on both sides of the served run
    if [ "$m" = mobilenet_v3_small ]; then
      served "r$r-$m-float32-n1-worker" "$m" 1 float32 worker "64"
      served "r$r-$m-float32-n$n-api" "$m" "$n" float32 api "1 64"
      served "r$r-$m-float32-n$n-fixedthreads" "$m" "$n" float32 worker "1 64" --no-adaptive-threads
    fi
    if [ "$m" = resnet18 ] && [ "$BF16" = 1 ]; then
      inproc "r$r-$m-bfloat16-inproc" "$m" bfloat16 "$sizes"
      served "r$r-$m-bfloat16-n$n-worker" "$m" "$n" bfloat16 worker "64"
    fi
  done
done
[ "$BF16" = 1 ] && $PY bench/dtype_agreement.py --model resnet18 --dtype bfloat16 | tee "$OUT/bf16-top1.txt"
$PY bench/cpu_summary.py "$OUT" "$SECONDS_PER_LEVEL" | tee "$OUT/summary.md"
