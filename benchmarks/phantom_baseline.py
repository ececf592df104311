"""A non-deep baseline on the phantom task: one threshold on one number per scan.

    python benchmarks/phantom_baseline.py [--config configs/phantom_lungs.yaml] [--n-train 120] [--n-test 80]

Each scan is sparsified with the config (which must set preprocess.blob_channel: true); its score
is the largest value of the blob (dot-filter) channel over its sites. The threshold that best
separates the training phantoms (seed 1) is applied to held-out phantoms (seed 2). This tells how
much of the task a single hand-made feature solves, i.e. the floor a trained network should beat.
Writes benchmarks/results/phantom_baseline.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ctsparse.config import load_config
from ctsparse.data.phantoms import case_rng, make_phantom, phantom_labels
from ctsparse.sparsify import sparsify


def scores(n: int, seed: int, cfg_path: str) -> tuple[np.ndarray, np.ndarray, list[float]]:
    cfg = load_config(cfg_path, []).preprocess
    if not cfg.blob_channel:
        raise SystemExit(f"{cfg_path}: preprocess.blob_channel must be true")
    s, y, diam = [], [], []
    for i, label in enumerate(phantom_labels(n, seed)):
        vol = make_phantom(label, case_rng(seed, i), vary_geometry=True)
        sv = sparsify(vol, cfg)
        s.append(float(sv.feats[:, -1].max()))
        y.append(int(label == "nodule"))
        diam.append(float(vol.meta.get("nodule_diameter_mm", 0.0)))  # type: ignore[arg-type]
    return np.array(s), np.array(y), diam


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/phantom_lungs.yaml")
    ap.add_argument("--n-train", type=int, default=120)
    ap.add_argument("--n-test", type=int, default=80)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/phantom_baseline.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    s_tr, y_tr, _ = scores(args.n_train, 1, args.config)
    s_te, y_te, d_te = scores(args.n_test, 2, args.config)
    cands = np.unique(s_tr)
    acc_tr = [float(np.mean((s_tr >= c) == y_tr)) for c in cands]
    thr = float(cands[int(np.argmax(acc_tr))])
    pred = s_te >= thr
    nod = y_te == 1
    d = np.array(d_te)
    small = nod & (d < 10.0)
    result = {
        "config": args.config,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "threshold": round(thr, 4),
        "train_accuracy": round(max(acc_tr), 4),
        "test_accuracy": round(float(np.mean(pred == y_te)), 4),
        "test_sensitivity": round(float(np.mean(pred[nod])), 4),
        "test_specificity": round(float(np.mean(~pred[~nod])), 4),
        "test_sensitivity_nodules_under_10mm": round(float(np.mean(pred[small])), 4) if small.any() else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
