#!/usr/bin/env bash
# Run the demo: a private broker, the server on SQLite, and emulated devices through the real agent.
# Extra arguments go to the demo, e.g.  scripts/demo.sh --help
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
exec "$venv/bin/python" -m harness.demo "$@"  # harness/ is demo and test infrastructure, not installed
