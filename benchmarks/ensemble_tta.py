"""Do averaging models or a test-time flip help? Single checkpoints, each with a left-right flip
averaged in, and their ensemble, on one labelled folder.

    python benchmarks/ensemble_tta.py TEST_DIR RUN_A/best.pt RUN_B/best.pt ... [--positive nodule]

For every checkpoint: AUROC and accuracy (at its stored operating threshold) of its calibrated
probability of the positive class, and of the mean of that probability on the scan and on the scan
flipped left-right (the flip of training's augmentation, exact on the grid). With several
checkpoints, the same for the mean of their probabilities, at the mean of their thresholds. Each
scan is sparsified once per distinct preprocessing among the checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ctsparse.calibration import Decision
from ctsparse.collate import collate
from ctsparse.data.augment import AugmentParams, apply
from ctsparse.models.checkpoint import build_from_checkpoint
from ctsparse.sparse_volume import SparseVolume
from ctsparse.sparsify import sparsify_cached
from ctsparse.training.metrics import auroc

F64 = npt.NDArray[np.float64]
FLIP = AugmentParams(flip_lr=True, angle_rad=0.0, scale=1.0, hu_shift=0.0)
# (preprocessing as JSON, scan path) -> its sparse volume, shared by checkpoints that agree
SPARSE: dict[tuple[str, str], SparseVolume] = {}


def sparse(path: Path, cfg: Any) -> SparseVolume:
    key = (json.dumps(dataclasses.asdict(cfg), sort_keys=True), str(path))
    if key not in SPARSE:
        SPARSE[key] = sparsify_cached(str(path), cfg, None)[0]
    return SPARSE[key]


def scores(checkpoint: str, test: Path, names: list[str], positive: str) -> tuple[F64, F64, float]:
    """(probability, flip-averaged probability, threshold) of the positive class per scan."""
    model, ckpt = build_from_checkpoint(checkpoint)
    model.eval()
    decision = Decision.from_dict(ckpt.extra.get("decision"))
    pos = ckpt.classes.index(positive)
    plain: list[float] = []
    flipped: list[float] = []
    for name in names:
        sv = sparse(test / name, ckpt.config.preprocess)
        for out, v in ((plain, sv), (flipped, apply(sv, FLIP))):
            with torch.no_grad():
                batch = collate([v], None, ckpt.config.model, torch.device("cpu"))
                logits = model(batch.inputs).float().numpy()
            out.append(float(decision.probabilities(logits)[0, pos]))
    p, f = np.array(plain), np.array(flipped)
    threshold = decision.threshold if decision.threshold is not None else 0.5
    return p, (p + f) / 2, float(threshold)


def line(name: str, y: npt.NDArray[np.bool_], p: F64, threshold: float) -> str:
    return f"{name}: AUROC {auroc(p, y):.3f}, accuracy {float(((p >= threshold) == y).mean()):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("test", type=Path, help="labelled folder (labels.csv: path,label)")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--positive", default="nodule")
    args = ap.parse_args()
    with open(args.test / "labels.csv", newline="") as fh:
        labels = {r["path"]: r["label"] for r in csv.DictReader(fh)}
    names = sorted(labels)
    y = np.array([labels[n] == args.positive for n in names])
    runs = [scores(ck, args.test, names, args.positive) for ck in args.checkpoints]
    for ck, (p, pf, thr) in zip(args.checkpoints, runs, strict=True):
        print(f"{ck} (threshold {thr:.3f})")
        print("  " + line("single", y, p, thr))
        print("  " + line("with its flip", y, pf, thr))
    if len(runs) > 1:
        thr = float(np.mean([r[2] for r in runs]))
        print(f"ensemble of {len(runs)} (mean threshold {thr:.3f})")
        print("  " + line("mean probability", y, np.mean([r[0] for r in runs], axis=0), thr))
        print("  " + line("with flips", y, np.mean([r[1] for r in runs], axis=0), thr))


if __name__ == "__main__":
    main()
