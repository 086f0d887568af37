#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
# (torch is pinned to 2.13.0 here: on the project's machines that is a local CPU build.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[dev,mrml]"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m pytest -q "$@"
