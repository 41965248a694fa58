#!/usr/bin/env bash
# Everything the tests need, from a fresh machine: redis-server and nginx (apt, when root and missing),
# a venv in .venv with the project and its worker and test extras, then lint, types and pytest.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k batching
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: redis-server (required); nginx to check docker/nginx.conf (its tests skip without it).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || echo "could not install ${missing[*]}" >&2
  fi
  command -v redis-server >/dev/null 2>&1 || {
    echo "redis-server is missing: install it (apt-get install redis-server / brew install redis)" >&2
    exit 1
  }
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e '.[worker,test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
