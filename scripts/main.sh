#!/usr/bin/env bash
# The main job: set up, then the whole default pipeline offline on CPU (assets from PyPI,
# training and evaluator reward models, base evaluation, GRPO, PPO, DPO, their evaluations
# and the comparison report in runs/default/report.md). A rerun reuses finished stages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
OUT="${1:-runs/default}"
mogrpo run --config configs/default.yaml --output "$OUT"
