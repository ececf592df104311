"""How far does one hand-made cue separate the phantom classes, per voxel size?

The cue is the maximum of the blob (dot-enhancement) channel inside the lung region, the value
the planned model's pooled input hands to its head. Its AUROC over phantoms of one seed bounds
what that shortcut alone can give, per nodule size, at a given phantom spacing.

    python benchmarks/blob_ceiling.py --spacing 3.65x3.65x5 --n 80 --seed 31
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

from ctsparse.config import load_config
from ctsparse.data.phantoms import case_rng, make_phantom, phantom_labels
from ctsparse.sparsify import sparsify

LUNG_SETTINGS = [
    "preprocess.region=lungs",
    "preprocess.blob_channel=true",
    "preprocess.threshold=-700",
    "preprocess.features=hu",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spacing", default="3.65x3.65x5")
    ap.add_argument("--n", type=int, default=80)
    ap.add_argument("--seed", type=int, default=31)
    args = ap.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split("x"))
    cfg = load_config(None, LUNG_SETTINGS)
    positive, cue, diameter = [], [], []
    for i, label in enumerate(phantom_labels(args.n, args.seed)):
        vol = make_phantom(label, case_rng(args.seed, i), spacing=spacing, vary_geometry=True)
        sv = sparsify(vol, cfg.preprocess)
        positive.append(label == "nodule")
        cue.append(float(sv.feats[:, -1].max()))
        diameter.append(float(vol.meta.get("nodule_diameter_mm", 0.0)))
    y, s, d = np.array(positive), np.array(cue), np.array(diameter)
    print(f"spacing {args.spacing} mm, {args.n} phantoms of seed {args.seed}")
    print(f"  all nodules: AUROC {roc_auc_score(y, s):.3f} ({int(y.sum())} nodules)")
    for lo, hi in [(6, 10), (10, 14), (14, 21)]:
        m = ~y | ((d >= lo) & (d < hi))
        print(f"  {lo}-{hi} mm nodules: AUROC {roc_auc_score(y[m], s[m]):.3f} ({int((y & m).sum())} nodules)")


if __name__ == "__main__":
    main()
