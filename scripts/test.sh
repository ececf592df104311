#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run every check: ruff lint, ruff format, mypy, and the
# whole pytest suite including tests marked slow. Extra arguments go to pytest.
#
#   bash scripts/test.sh            # what CI runs
#   bash scripts/test.sh -m "not slow"   # the quick local loop
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CTSPARSE_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"

echo "[test] ruff check"; ruff check ctsparse cli tests benchmarks scripts
echo "[test] ruff format --check"; ruff format --check ctsparse cli tests benchmarks scripts
echo "[test] mypy"; mypy ctsparse cli
echo "[test] pytest"; python -m pytest "$@"
