"""How far does one hand-made cue separate the phantom classes, per voxel size?

The cue is the maximum of the blob (dot-enhancement) channel inside the lung region, the value
the planned model's pooled input hands to its head. Its AUROC over phantoms of one seed bounds
what that shortcut alone can give, per nodule size, at a given phantom spacing.

    python benchmarks/blob_ceiling.py --spacing 3.65x3.65x5 --n 80 --seed 31

`--resample 3.65x3.65x5` resamples every phantom to that grid first, as a planned run does with
the dataset's median spacing (the phantoms' in-plane spacing varies by +-10 %), and
`--blob-grid scan|resampled` says where the filter then runs (preprocess.blob_grid). `--nodule-mm`
sets the phantoms' nodule range.
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
    ap.add_argument("--resample", default=None, help="resample to XxYxZ mm first, e.g. 3.65x3.65x5")
    ap.add_argument("--blob-grid", choices=["scan", "resampled"], default="scan")
    ap.add_argument("--nodule-mm", default="6-20")
    args = ap.parse_args()
    spacing = tuple(float(v) for v in args.spacing.split("x"))
    nodule_mm = tuple(float(v) for v in args.nodule_mm.split("-"))
    settings = [*LUNG_SETTINGS, f"preprocess.blob_grid={args.blob_grid}"]
    if args.resample:
        settings.append(f"preprocess.spacing=[{args.resample.replace('x', ',')}]")
    cfg = load_config(None, settings)
    positive, cue, diameter = [], [], []
    for i, label in enumerate(phantom_labels(args.n, args.seed)):
        vol = make_phantom(
            label,
            case_rng(args.seed, i),
            spacing=spacing,
            vary_geometry=True,
            nodule_mm=(nodule_mm[0], nodule_mm[1]),
        )
        sv = sparsify(vol, cfg.preprocess)
        positive.append(label == "nodule")
        cue.append(float(sv.feats[:, -1].max()))
        diameter.append(float(vol.meta.get("nodule_diameter_mm", 0.0)))
    y, s, d = np.array(positive), np.array(cue), np.array(diameter)
    how = f", resampled to {args.resample} mm, filter on the {args.blob_grid} grid" if args.resample else ""
    print(
        f"spacing {args.spacing} mm{how}, {args.nodule_mm} mm nodules, {args.n} phantoms of seed {args.seed}"
    )
    print(f"  all nodules: AUROC {roc_auc_score(y, s):.3f} ({int(y.sum())} nodules)")
    for lo, hi in [(6, 10), (10, 14), (14, 21)]:
        m = ~y | ((d >= lo) & (d < hi))
        print(f"  {lo}-{hi} mm nodules: AUROC {roc_auc_score(y[m], s[m]):.3f} ({int((y & m).sum())} nodules)")


if __name__ == "__main__":
    main()
