#!/usr/bin/env bash
# Set everything up, then the main job: synthetic chest CTs for training and a held-out set from
# another seed, a training run that configures itself (no hand-written config) within a 3.5-minute
# budget, evaluation on the held-out set with confidence intervals, prediction and a sparsity
# profile of the bundled samples (data_samples/: NIfTI and DICOM), a short sparse-vs-dense
# benchmark, and a summary. The phantoms carry 10-20 mm nodules, as the bundled samples do, on a
# 3.65 x 3.65 x 5 mm grid (the default phantoms, 6-20 mm nodules at 2.5 mm, need the planner's
# 10-minute training: see docs/benchmarks.md). About 2-4 minutes on 2 cores.
# Outputs go to runs/demo/ (or the folder given as the first argument).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CTSPARSE_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
OUT=${1:-runs/demo}
N_TRAIN=${CTSPARSE_DEMO_TRAIN:-200}
N_HELDOUT=${CTSPARSE_DEMO_HELDOUT:-60}
mkdir -p "$OUT"

ctsparse doctor
ctsparse phantoms "$OUT/train" --n "$N_TRAIN" --seed 0 --nodule-mm 10-20 --spacing 3.65x3.65x5
ctsparse phantoms "$OUT/heldout" --n "$N_HELDOUT" --seed 2000 --nodule-mm 10-20 --spacing 3.65x3.65x5
ctsparse train "$OUT/train" --out "$OUT/run" --overwrite --workers 2 --set train.max_minutes=3.5
ctsparse evaluate "$OUT/run/best.pt" "$OUT/heldout" --out "$OUT/evaluate"
ctsparse predict "$OUT/run/best.pt" data_samples --out "$OUT/predictions.csv"
ctsparse profile data_samples --json "$OUT/profile.json"
ctsparse benchmark --thresholds "" --fills 0.05,0.1,0.2,0.4 --runs 5 --no-train-step \
  --json "$OUT/benchmark.json"
python scripts/demo_summary.py "$OUT"
