#!/usr/bin/env bash
# A/B of two (or more) source trees on this machine, alternating, so that both meet the same
# weather on a shared VM: for each tree in turn, one worker and one API process from that tree on a
# fresh private Redis, then 200 lone requests back to back (p50, and the part outside the worker's
# own step) and 64 clients for 8 s with the CPU each process group used per request.
#
#   git worktree add /tmp/base HEAD~1                     # the baseline, beside the working tree
#   bash bench/ab_check.sh /tmp/base .                    # from the repo root, with scripts/test.sh's venv
#   MODEL=null ROUNDS=3 bash bench/ab_check.sh /tmp/base .  # the path alone (bench/null_worker.py)
#   bash bench/ab_check.sh . ".:--instances 2"              # one tree, two ways: TREE:WORKER_FLAGS
# Knobs: ROUNDS=3, MODEL=mobilenet_v3_small (or null), MAX_BATCH=32, CLIENTS=64, RUN_S=8,
# WORKER_FLAGS="", PYTHON=.venv/bin/python (this tree's venv runs every tree), OUT=out/ab.
OUT=${OUT:-out/ab}
source bench/env.sh
ROUNDS=${ROUNDS:-3} MODEL=${MODEL:-mobilenet_v3_small} MAX_BATCH=${MAX_BATCH:-32} CLIENTS=${CLIENTS:-64}
SECONDS_PER_RUN=${RUN_S:-8} PYABS="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # the venv's, symlink kept
[ $# -ge 1 ] || { echo "usage: bash bench/ab_check.sh TREE [TREE...]" >&2; exit 2; }

run_tree() {  # tree[:worker flags] round
  local tree=${1%%:*} flags="" name want
  [[ $1 == *:* ]] && flags=${1#*:}
  name="r$2-$(basename "$(realpath "$tree")")$(tr -d ' -' <<<"${flags:++$flags}")"
  want=$(grep -oE -- '--instances[ =][0-9]+' <<<"$flags" | grep -oE '[0-9]+$' || echo 1)
  start_redis
  sleep 0.3
  (
    cd "$tree" || exit 1
    export PYTHONPATH=$PWD
    if [ "$MODEL" = null ]; then
      exec "$PYABS" bench/null_worker.py null
    else
      # shellcheck disable=SC2086
      exec "$PYABS" -m common.cli worker --model "$MODEL" --weights random --device cpu \
        --max-batch-size "$MAX_BATCH" --preprocess worker ${WORKER_FLAGS:-} $flags
    fi
  ) >"$OUT/$name-worker.log" 2>&1 &
  local wpid=$!
  (cd "$tree" && PYTHONPATH=$PWD exec "$PYABS" -m common.cli api --bind "127.0.0.1:$HTTP" --workers 1) \
    >"$OUT/$name-api.log" 2>&1 &
  local apid=$!
  pids+=("$wpid" "$apid")
  wait_ready 120
  for _ in $(seq 1 240); do  # every worker process registered, not only the first
    [ "$(redis-cli -p "$PORT" --scan --pattern '*:worker:*' | wc -l)" -ge "$want" ] && break
    sleep 0.5
  done
  local lone
  lone=$($PY bench/lone.py "http://127.0.0.1:$HTTP" "$MODEL" 200)
  $RB bench --url "http://127.0.0.1:$HTTP" --model "$MODEL" --concurrency "$CLIENTS" --duration-s "$SECONDS_PER_RUN" \
    --warmup-s 2 --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 &
  local bpid=$!
  sleep 3
  cpu_window "$name" $((SECONDS_PER_RUN - 2)) "$bpid" "$OUT/$name.json" \
    "api=$apid,$(pgrep -P "$apid" | paste -sd,)" "worker=$wpid$(pgrep -P "$wpid" | sed 's/^/,/' | tr -d '\n')" "redis=$RPID" "bench=$bpid"
  echo "$name | $RPS req/s | $CPU_SPLIT | lone $lone"
  kill "$apid" "$wpid" "$RPID"
  wait "$apid" "$wpid" "$RPID" 2>/dev/null
}

echo "round-tree | $CLIENTS clients | CPU ms per request by process group | $MODEL, 200 lone requests"
for r in $(seq 1 "$ROUNDS"); do
  for tree in "$@"; do run_tree "$tree" "$r"; done
done | tee "$OUT/summary.txt"
