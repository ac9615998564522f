#!/usr/bin/env bash
# The test command (README): installs what it needs, checks style, runs every test tier.
#
#   sudo scripts/test.sh            # all: ruff, unit tests, end-to-end tests in the lab
#   sudo scripts/test.sh -k redirect  # extra arguments go to pytest
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
"$ROOT/scripts/install.sh"
VENV=${VENV:-$ROOT/.venv}

echo "== ruff"
"$VENV/bin/ruff" format --check .
"$VENV/bin/ruff" check .

echo "== tests"
# A lab left over from an interrupted run would make the e2e tests fail at `up`.
"$VENV/bin/meshlab" down >/dev/null 2>&1 || true
trap '"$VENV/bin/meshlab" down >/dev/null 2>&1 || true' EXIT
"$VENV/bin/python" -m pytest -p no:cacheprovider -q -rfEs tests "$@"
