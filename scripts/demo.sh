#!/usr/bin/env bash
# The demo command (README): installs what it needs, then runs `meshlab demo`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/install.sh"
exec "${VENV:-$ROOT/.venv}/bin/meshlab" demo
