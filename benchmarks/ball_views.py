"""Does averaging a per-ball model over ball orientations help? Test-time views of the balls.

    python benchmarks/ball_views.py CHECKPOINT TEST_DIR [--json out.json]

For a checkpoint trained per ball (model.candidates > 0), every candidate ball of every scan is
shown to the network in several grid orientations (augment.orient, then aligned as at predict);
each ball's logits are averaged over its views, and the scan's score is its most abnormal ball's
log-odds against the background. Views: the ball as predict sees it; the 8 flips; the 6 axis
orders; all 48. Printed per view set: AUROC, and the best accuracy any single threshold on these
scores reaches on this folder (an oracle: it is fitted on the test labels, so it only bounds what
a better threshold could give; it is no result). With DATA/findings.csv, also how many positive
scans have no candidate ball on a finding (misses of the candidate stage, which no view can mend).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from ctsparse.candidates import ball_labels, most_abnormal, split_balls
from ctsparse.data.augment import aligned, orient
from ctsparse.data.datasets import discover_dataset, read_findings
from ctsparse.models.checkpoint import build_from_checkpoint
from ctsparse.models.registry import get_engine
from ctsparse.prepare import prepare_scans
from ctsparse.sparse_volume import SparseVolume
from ctsparse.training.metrics import auroc

Flips = tuple[bool, bool, bool]
Order = tuple[int, int, int]
FLIPS: list[Flips] = [(a, b, c) for a, b, c in itertools.product([False, True], repeat=3)]
ORDERS: list[Order] = [(a, b, c) for a, b, c in itertools.permutations(range(3))]
VIEWS: dict[str, list[tuple[Flips, Order]]] = {
    "as predict": [((False, False, False), (0, 1, 2))],
    "8 flips": [(f, (0, 1, 2)) for f in FLIPS],
    "6 axis orders": [((False, False, False), o) for o in ORDERS],
    "48 orientations": [(f, o) for f in FLIPS for o in ORDERS],
}


def oracle_accuracy(scores: np.ndarray, positive: np.ndarray) -> float:
    """The best accuracy of `scores >= t` over every threshold t (fitted on these labels)."""
    return max(float(np.mean((scores >= t) == positive)) for t in np.unique(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model, ckpt = build_from_checkpoint(args.checkpoint)
    model.eval()
    cfg = ckpt.config
    k, bg = cfg.model.candidates, cfg.model.background
    if k <= 0:
        raise SystemExit(f"{args.checkpoint}: not a per-ball model (model.candidates is 0)")
    engine = get_engine(cfg.model.backend)
    samples = discover_dataset(args.data)
    prepared = prepare_scans([s.path for s in samples], cfg.preprocess, cfg.data.cache_dir, 0)
    ok = [(s, sv) for s, sv in zip(samples, prepared, strict=True) if isinstance(sv, SparseVolume)]
    positive = np.array([ckpt.classes.index(s.label) != bg for s, _ in ok])
    findings = read_findings(args.data)
    scores: dict[str, list[float]] = {name: [] for name in VIEWS}
    missed: list[str] = []  # positive scans with findings.csv rows but no ball on a finding
    dev = torch.device("cpu")
    with torch.no_grad():
        for (sample, sv), pos in zip(ok, positive, strict=True):
            balls = split_balls(sv, k)
            marks = findings.get(sample.path.resolve())
            if pos and marks is not None:
                label = ckpt.classes.index(sample.label)
                if label not in ball_labels(sv.with_findings(marks), balls, label, bg):
                    missed.append(sample.path.name)
            for name, views in VIEWS.items():
                shown = [aligned(orient(b, f, o)) for b in balls for f, o in views]
                z = model(engine.collate(shown, dev, engine.stride_multiple(cfg.model)), per_ball=True)
                z = z.reshape(k, len(views), -1).mean(dim=1)
                top = most_abnormal(z, k, bg)[0]
                others = torch.cat([top[:bg], top[bg + 1 :]])
                scores[name].append(float(torch.logsumexp(others, 0) - top[bg]))
    out = {}
    print(f"{len(ok)} scans ({int(positive.sum())} positive), {len(samples) - len(ok)} unreadable")
    if findings:
        print(f"positive scans without a candidate ball on a finding: {len(missed)} {missed}")
    for name, s in scores.items():
        arr = np.array(s)
        out[name] = {"auroc": auroc(arr, positive), "oracle_accuracy": oracle_accuracy(arr, positive)}
        a, o = out[name]["auroc"], out[name]["oracle_accuracy"]
        print(f"{name:>16}: AUROC {a:.4f}  oracle accuracy {o:.3f}")
    if args.json:
        record = {"checkpoint": str(args.checkpoint), "views": out, "missed": missed}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
