#!/usr/bin/env bash
# Set everything up and run the main job on the bundled samples: train a small sparse classifier
# on data_samples/, predict on the samples, profile their sparsity. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CTSPARSE_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
OUT=${1:-runs/demo}

ctsparse doctor
ctsparse train data_samples --config configs/demo.yaml --out "$OUT" --overwrite
ctsparse predict "$OUT/best.pt" data_samples --out "$OUT/predictions.csv"
ctsparse profile data_samples --json "$OUT/profile.json"
echo "[demo] outputs in $OUT/"
