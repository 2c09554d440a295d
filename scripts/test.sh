#!/usr/bin/env bash
# Run every check CI runs: lint, format, and the whole test suite (unit, property, integration).
# Extra arguments go to pytest, e.g.  scripts/test.sh -k envelope -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BT_NEED_POSTGRES=1 source "$root/scripts/setup.sh"
cd "$root"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
exec "$venv/bin/python" -m pytest "$@"
