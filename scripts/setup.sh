#!/usr/bin/env bash
# Create/refresh the project's virtual environment (.venv) and install mogrpo with its
# test extras, at the exact versions of constraints.txt (pyproject.toml holds ranges).
# Re-installs only when pyproject.toml or constraints.txt changed. Sourced by main.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOGRPO_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "mogrpo needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment in $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.mogrpo-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "installing mogrpo and the dependency versions of constraints.txt into $VENV (first run takes a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # torch first and pinned: on a CPU machine this takes the local CPU wheel, not CUDA packages.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$ROOT/constraints.txt" torch
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[test]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
