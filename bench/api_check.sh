#!/usr/bin/env bash
# The serving path's own cost, without a model: bench clients -> one gunicorn API process -> Redis
# -> bench/null_worker.py (answers every frame at once). For each gunicorn worker class, in
# alternating rounds: the 1-client p50 and, at 64 clients, req/s and the CPU each process group used
# per request (bench/proc_cpu.py). What it prints is what HTTP, the API and Redis cost per request.
#
#   bash bench/api_check.sh            # from the repo root, with the venv of scripts/test.sh
# Knobs: ROUNDS=3, CLASSES="gthread gevent gevent_pywsgi", SECONDS_PER_LEVEL=8, PYTHON=.venv/bin/python, OUT=out/api.
OUT=${OUT:-out/api}
source bench/env.sh
ROUNDS=${ROUNDS:-3} CLASSES=${CLASSES:-"gthread gevent gevent_pywsgi"} SECONDS_PER_LEVEL=${SECONDS_PER_LEVEL:-8} MODEL=null
start_redis
sleep 0.5
$PY bench/null_worker.py "$MODEL" >"$OUT/worker.log" 2>&1 &
WPID=$!
pids+=("$WPID")

echo "round class | 1 client p50 ms | 64 clients req/s | CPU ms per request by process group"
for r in $(seq 1 "$ROUNDS"); do
  for cls in $CLASSES; do
    $RB api --bind "127.0.0.1:$HTTP" --workers 1 --api-worker-class "$cls" >"$OUT/api-$cls.log" 2>&1 &
    apid=$!
    wait_ready 60
    name="r$r-$cls"
    $RB bench --url "http://127.0.0.1:$HTTP" --model $MODEL --concurrency 1 --duration-s 4 --warmup-s 1 \
      --json "$OUT/$name-c1.json" >"$OUT/$name-c1.txt" 2>&1
    $RB bench --url "http://127.0.0.1:$HTTP" --model $MODEL --concurrency 64 --duration-s "$SECONDS_PER_LEVEL" \
      --warmup-s 3 --json "$OUT/$name-c64.json" >"$OUT/$name-c64.txt" 2>&1 &
    bpid=$!
    sleep 4
    cpu_window "$name" $((SECONDS_PER_LEVEL - 2)) "$bpid" "$OUT/$name-c64.json" \
      "api=$apid,$(pgrep -P "$apid" | paste -sd,)" "worker=$WPID" "redis=$RPID" "bench=$bpid"
    p50=$($PY -c "import json; print(round(json.load(open('$OUT/$name-c1.json'))['levels'][0]['p50_ms'], 2))")
    echo "$r $cls | $p50 | $RPS | $CPU_SPLIT"
    kill "$apid"
    wait "$apid" 2>/dev/null
  done
done | tee "$OUT/summary.txt"
