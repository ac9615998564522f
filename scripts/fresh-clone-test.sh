#!/usr/bin/env bash
# Proves the test command on a fresh machine's terms: clones this repository's HEAD (committed
# work only) into a temporary folder, runs scripts/test.sh there, reports the elapsed time and
# removes the clone, also on failure.
#
#   sudo scripts/fresh-clone-test.sh [pytest args]   # clone in $TMPDIR (default /tmp)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/meshagent-fresh.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
git clone -q "$ROOT" "$tmp"
echo "== fresh clone of $(git -C "$tmp" rev-parse --short HEAD) in $tmp"
start=$SECONDS
status=0
(cd "$tmp" && scripts/test.sh "$@") || status=$?
echo "== scripts/test.sh in a fresh clone: exit $status after $((SECONDS - start)) s"
exit "$status"
