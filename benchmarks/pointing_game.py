"""Pointing game: does the saliency peak fall on the nodule the model found?

    python benchmarks/pointing_game.py --work /tmp/pointing [--max-minutes 10] [--checkpoint CK]

1. `ctsparse phantoms WORK/train --n 200 --seed 21 --nodule-mm 10-20` (the main job's nodules,
   scripts/demo.sh) and `ctsparse phantoms WORK/test --n 100 --seed 7021 --nodule-mm 10-20`: a
   held-out seed that no default, planner rule or earlier benchmark used; its findings.csv gives
   each nodule's centre (RAS+ mm) and radius.
2. `ctsparse train WORK/train --out WORK/run_NAME --workers 2 --set train.max_minutes=M` with no
   config (the planner decides, with its candidate stage off and 2^3 patches: WHOLE_LUNG) for
   each model NAME of MODELS: the planned sparse model, the dense
   twin with --set model.backend=dense, and (a check of Grad-CAM itself) the sparse network
   without input pooling. Runs already there are reused (or --checkpoint NAME=PATH).
3. For each model, every test scan is explained (ctsparse.explain.explain_volume) with
   gradcam, inputxgrad and occlusion, class "nodule". A correctly classified nodule case (true
   and predicted nodule, with the checkpoint's decision rule) is a hit for a method when that
   method's peak (the centre of its peak site) lies inside the nodule dilated by one voxel of
   the network's input grid: the ball of the nominal radius around the centre, Minkowski-summed
   with the box of +-one site spacing per axis. The random baseline is the chance that a
   uniformly random kept site does (exact: the share of the scan's sites inside), averaged.
   Also per case: the share of the logit margin (nodule minus the other class) that passes through
   the last stage, i.e. that disappears when the last stage's activations are set to zero (the
   rest reaches the head through input pooling): what Grad-CAM can see at all.
Writes RESULTS.json and RESULTS.md (default benchmarks/results/pointing_game.*).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CTSPARSE = [sys.executable, "-m", "ctsparse"]
METHODS = ("gradcam", "inputxgrad", "occlusion")
# Grad-CAM of the last stage's map alone (without the input-pooling map the head also reads)
LAST_ONLY = "gradcam_last_stage"
TRAIN_SEED, TEST_SEED = 21, 7021
# Every model sees the whole lung region: with the planner's candidate stage a saliency peak could
# only fall in the 32 balls around the strongest blobs, which would score the candidate stage
# rather than the explanation method. The models see 2^3 patches on a 7.3 x 7.3 x 10 mm grid, where
# the planner would make every voxel a site on these 5 mm slices: the documented figures are theirs.
WHOLE_LUNG = ["preprocess.blob_candidates=0", "preprocess.features=patch", "preprocess.patch_size=2"]
# name -> the --set overrides of its `ctsparse train` on top of the planned settings
MODELS = {
    "sparse": [*WHOLE_LUNG],
    "dense": [*WHOLE_LUNG, "model.backend=dense"],
    # a check of Grad-CAM itself: without input pooling the whole answer passes the last stage
    # (trained on the minkowski engine, the same network, which trains it faster on this CPU)
    "sparse_no_input_pooling": [*WHOLE_LUNG, "model.input_pooling=false", "model.backend=minkowski"],
}


def run(args: list[str], log: Path) -> float:
    print("+", " ".join(args), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit code {done.returncode}: see {log}")
    return time.perf_counter() - t0


def inside_dilated(point: np.ndarray, centre: np.ndarray, radius: float, spacing: np.ndarray) -> bool:
    """Whether `point` lies in the ball (centre, radius) dilated by the box of +-spacing."""
    gap = np.maximum(np.abs(point - centre) - spacing, 0.0)
    return bool(np.linalg.norm(gap) <= radius)


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    train, test = work / "train", work / "test"
    nod = ["--nodule-mm", "10-20", "--spacing", "3.65x3.65x5", "--workers", "2"]
    if not (train / "labels.csv").exists():
        run(
            [*CTSPARSE, "phantoms", str(train), "--n", "200", "--seed", str(TRAIN_SEED), *nod],
            work / "gen.log",
        )
    if not (test / "findings.csv").exists():
        run(
            [*CTSPARSE, "phantoms", str(test), "--n", "100", "--seed", str(TEST_SEED), *nod],
            work / "gen_test.log",
        )
    checkpoints = {}
    for name in args.models.split(","):
        ck = Path(args.checkpoint[name]) if name in args.checkpoint else work / f"run_{name}" / "best.pt"
        if not ck.exists():
            cmd = [*CTSPARSE, "train", str(train), "--out", str(ck.parent), "--workers", "2", "--overwrite"]
            for key in [f"train.max_minutes={args.max_minutes:g}", *MODELS[name]]:
                cmd += ["--set", key]
            run(cmd, work / f"train_{name}.log")
        checkpoints[name] = ck
    return checkpoints


def last_stage_share(model: Any, ckpt: Any, sv: Any) -> float:
    """Share of the nodule-vs-other logit margin that vanishes when the last stage outputs zeros."""
    import torch

    from ctsparse.models.registry import get_engine

    engine = get_engine(ckpt.config.model.backend)
    k = ckpt.classes.index("nodule")
    with torch.no_grad():
        stage = engine.explain.last_stage(
            model, engine.inputs([sv], torch.device("cpu"), ckpt.config.model), sv
        )
    full, zero = (
        stage.head(f).detach().double().numpy()[0] for f in (stage.feats, torch.zeros_like(stage.feats))
    )
    margin = full[k] - np.delete(full, k).max()
    return float((margin - (zero[k] - np.delete(zero, k).max())) / margin)


def score_backend(checkpoint: Path, test: Path, methods: list[str], limit: int = 0) -> dict[str, Any]:
    import torch

    from ctsparse.explain import explain_volume
    from ctsparse.io import read_volume
    from ctsparse.models.checkpoint import build_from_checkpoint
    from ctsparse.sparsify import sparsify

    model, ckpt = build_from_checkpoint(checkpoint)
    model.eval()
    with open(test / "labels.csv", newline="") as fh:
        labels = {r["path"]: r["label"] for r in csv.DictReader(fh)}
    if limit:
        labels = dict(list(labels.items())[:limit])
    with open(test / "findings.csv", newline="") as fh:
        findings = {r["path"]: r for r in csv.DictReader(fh)}
    hits: dict[str, list[bool]] = {m: [] for m in [*methods, LAST_ONLY]}
    random_share: list[float] = []
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    correct, cases = 0, []
    for path, truth in labels.items():
        vol = read_volume(test / path)
        sv = sparsify(vol, ckpt.config.preprocess)
        first = explain_volume(model, vol, ckpt, method="gradcam", target="nodule", sv=sv)
        correct += first.label == truth
        if not (truth == "nodule" and first.label == "nodule"):
            continue
        f = findings[path]
        centre = np.array([float(f["x_mm"]), float(f["y_mm"]), float(f["z_mm"])])
        radius, spacing = float(f["radius_mm"]), np.array(sv.spacing)
        case: dict[str, Any] = {"path": path, "radius_mm": radius, "p_nodule": first.probabilities["nodule"]}
        for m in methods:
            t0 = time.perf_counter()
            expl = (
                first
                if m == "gradcam"
                else explain_volume(model, vol, ckpt, method=m, target="nodule", sv=sv)
            )
            seconds[m].append(time.perf_counter() - t0 if m != "gradcam" else first.info["time_saliency_s"])
            hit = inside_dilated(np.array(expl.peak_mm), centre, radius, spacing)
            hits[m].append(hit)
            case[m] = {"peak_mm": [round(v, 2) for v in expl.peak_mm], "hit": hit}
        alone = inside_dilated(np.array(first.info["last_stage_peak_mm"]), centre, radius, spacing)
        hits[LAST_ONLY].append(alone)
        case[LAST_ONLY] = {"peak_mm": first.info["last_stage_peak_mm"], "hit": alone}
        case["last_stage_share"] = last_stage_share(model, ckpt, sv)
        mm = (sv.affine @ np.c_[sv.coords, np.ones(sv.n_sites)].T)[:3].T
        share = float(np.mean([inside_dilated(p, centre, radius, spacing) for p in mm]))
        random_share.append(share)
        case["random_share"] = share
        cases.append(case)
        print(
            f"  {checkpoint.parent.name} {path}: " + " ".join(f"{m}={case[m]['hit']}" for m in methods),
            flush=True,
        )
    n = len(cases)
    return {
        "checkpoint": str(checkpoint),
        "backend": ckpt.config.model.backend,
        "test_accuracy": correct / len(labels),
        "nodule_cases": sum(v == "nodule" for v in labels.values()),
        "correct_nodule_cases": n,
        "pointing": {m: (sum(hits[m]) / n if n else float("nan")) for m in hits},
        "hits": {m: sum(hits[m]) for m in hits},
        "random_peak": statistics.fmean(random_share) if random_share else float("nan"),
        "median_last_stage_share": statistics.median(c["last_stage_share"] for c in cases) if cases else None,
        "median_explain_s": {m: statistics.median(seconds[m]) for m in methods if seconds[m]},
        "input_grid_mm": list(sv.spacing),
        "cases": cases,
        "threads": torch.get_num_threads(),
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| model | test accuracy | correct nodule cases | Grad-CAM | input × gradient | occlusion "
        "| Grad-CAM of the last stage alone | random kept site "
        "| logit margin through the last stage (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["models"]:
        p, h, n = r["pointing"], r["hits"], r["correct_nodule_cases"]
        cells = [
            f"**{100 * p[m]:.1f} %** ({h[m]}/{n})" if m == "gradcam" else f"{100 * p[m]:.1f} % ({h[m]}/{n})"
            for m in [*METHODS, LAST_ONLY]
        ]
        lines.append(
            f"| {r['model']} | {100 * r['test_accuracy']:.0f} % | {n} of {r['nodule_cases']} | "
            + " | ".join(cells)
            + f" | {100 * r['random_peak']:.1f} % | {100 * r['median_last_stage_share']:.0f} % |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--max-minutes", type=float, default=10.0, help="train.max_minutes of each training")
    ap.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="reuse a trained checkpoint for model NAME (of --models) instead of WORK/run_NAME/best.pt",
    )
    ap.add_argument("--models", default="sparse,dense", help=f"which models to score, of {', '.join(MODELS)}")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N test scans (a quick check)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/pointing_game.json"))
    args = ap.parse_args(argv)
    args.checkpoint = dict(c.split("=", 1) for c in args.checkpoint)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoints = prepare(args.work, args)
    res: dict[str, Any] = {
        "train_seed": TRAIN_SEED,
        "test_seed": TEST_SEED,
        "nodule_mm": [10, 20],
        "max_minutes": args.max_minutes,
        "hit_rule": "peak site centre inside the nodule ball (nominal radius) dilated by +-one input-grid "
        "voxel per axis",
        "machine": f"{platform.machine()}, 2 cores shared",
        "models": [],
    }
    for name in args.models.split(","):
        print(f"scoring {name}: {checkpoints[name]}", flush=True)
        scored = score_backend(checkpoints[name], args.work / "test", list(METHODS), args.limit)
        res["models"].append({"model": name, "train_set": MODELS[name], **scored})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    args.out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
