#!/usr/bin/env bash
# The private internals of websockets and aiokafka that okx-ingest relies on, checked against the oldest and
# the newest release each pin in pyproject.toml allows. Each run gets its own throwaway venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TESTS=(tests/unit/test_aiokafka_compat.py tests/unit/test_ws_tap.py)
run() {  # run NAME PIN...
  local venv=".venv-compat-$1"; shift
  test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]' "$@"
  echo "== $* ($("$venv/bin/python" -c 'import aiokafka, websockets; print("aiokafka", aiokafka.__version__, "websockets", websockets.__version__)'))"
  "$venv/bin/pytest" -q -p no:cacheprovider "${TESTS[@]}"
}
run oldest "aiokafka==0.11.0" "websockets==15.0.1"
run newest "aiokafka<0.15" "websockets<18" --upgrade-strategy only-if-needed -U
