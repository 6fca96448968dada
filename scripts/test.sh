#!/usr/bin/env bash
# Set up and run the whole test suite (offline, CPU). Extra arguments go to pytest.
# pytest's own exit status is returned unchanged: 5 ("no tests ran") is a failure too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
