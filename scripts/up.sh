#!/usr/bin/env bash
# Install (a venv in .venv with the worker extra) and run the whole service: `redbatch up`.
# Extra arguments go to `redbatch up`, e.g.  scripts/up.sh --model mobilenet_v3_small
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e '.[worker]'
exec .venv/bin/redbatch up "$@"
