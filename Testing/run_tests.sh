#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
# (torch is pinned to 2.13.0 here: on the project's machines that is a local CPU build.)
set -euo pipefail
cd "$(dirname "$0")/.."
# A private virtual environment keeps the tests' editable install from replacing whatever
# msdseg the machine already has (and makes a fresh machine and CI behave the same).
VENV=${MSDSEG_TEST_VENV:-"$PWD/.venv-test"}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[all]"
# The web app's browser test drives Debian's chromium through chromedriver; install them when
# missing and allowed (root with apt-get), otherwise that one test skips with its reason.
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
    || echo "run_tests.sh: could not install chromium/chromium-driver; the browser test will be skipped" >&2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m pytest -q "$@"
