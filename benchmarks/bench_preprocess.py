"""Preprocessing a fine chest CT for the lung region: what the lung region and the blob channel cost.

    python benchmarks/bench_preprocess.py --runs 3 --json benchmarks/results/preprocess.json
    python benchmarks/bench_preprocess.py SCAN.nii.gz --spacing 0.96,0.96,1.25 --runs 3

Without a scan, one phantom chest at 0.7 x 0.7 x 1.25 mm (a 500 x 500 x ~280 grid, as a clinical
chest CT) is written once into --cache. The config is the one the planner gives such a dataset:
lung region, blob channel, threshold -700 HU, 4^3 patches (`--spacing` resamples first, as a
planned preprocess.spacing does).

Side by side in one process, interleaved run by run, medians of --runs:
- `sparsify` with preprocess.lung_grid_mm null (the lung region's closing and outline band on the
  scan's own grid) and 2.0 (on ~2 mm blocks, the default), per stage, and how many kept voxels
  the two regions disagree on;
- the Hessian eigenvalues of the blob filter on --matrices random symmetric 3x3 matrices:
  np.linalg.eigvalsh on the stacked matrices against filters.symmetric_eigenvalues (closed form).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ctsparse.config import load_config
from ctsparse.filters import symmetric_eigenvalues
from ctsparse.io import read_volume
from ctsparse.sparsify import sparsify

LUNG_SETTINGS = [
    "preprocess.region=lungs",
    "preprocess.blob_channel=true",
    "preprocess.threshold=-700",
    "preprocess.features=patch",
    "preprocess.patch_size=4",
]


def phantom_scan(cache: Path) -> Path:
    scan = cache / "case_0000.nii.gz"
    if not scan.exists():
        cmd = [sys.executable, "-m", "ctsparse", "phantoms", str(cache), "--n", "1", "--seed", "4242"]
        cmd += ["--spacing", "0.7x0.7x1.25", "--classes", "nodule", "--workers", "1"]
        subprocess.run(cmd, check=True)
    return scan


def region_disagreement(volume: Any, cfgs: dict[str, Any]) -> dict[str, int]:
    """Voxels above the threshold that one lung region keeps and the other does not."""
    from ctsparse.masks import body_in_box
    from ctsparse.regions import lung_region
    from ctsparse.sparsify import resample

    cfg = next(iter(cfgs.values()))
    hu, affine = volume.array, volume.affine
    if cfg.spacing is not None:
        hu, affine = resample(hu, affine, cfg.spacing)
    found = body_in_box(hu >= -500)
    assert found is not None
    box, body = found
    sp = np.linalg.norm(affine[:3, :3], axis=0)
    above = hu[box] >= cfg.threshold
    kept = [above & lung_region(hu[box], body, sp, c.lung_closing_mm, c.lung_grid_mm) for c in cfgs.values()]
    return {"kept_voxels": int(kept[0].sum()), "kept_by_one_only": int((kept[0] ^ kept[1]).sum())}


def time_sparsify(volume: Any, cfgs: dict[str, Any], runs: int) -> dict[str, Any]:
    walls: dict[str, list[float]] = {k: [] for k in cfgs}
    stages: dict[str, dict[str, list[float]]] = {k: {} for k in cfgs}
    last: dict[str, Any] = {}
    for _ in range(runs):
        for name, cfg in cfgs.items():  # interleaved: load from outside falls on both alike
            t0 = time.perf_counter()
            sv = sparsify(volume, cfg)
            walls[name].append(time.perf_counter() - t0)
            for stage, t in sv.stats["times"].items():
                stages[name].setdefault(stage, []).append(t)
            last[name] = sv
    out: dict[str, Any] = {}
    for name in cfgs:
        out[name] = {
            "median_s": round(statistics.median(walls[name]), 3),
            "runs_s": [round(t, 3) for t in walls[name]],
            "stages_median_s": {k: round(statistics.median(v), 3) for k, v in stages[name].items()},
            "sites": int(last[name].n_sites),
        }
    out["region"] = region_disagreement(volume, cfgs)
    return out


def time_eigen(n: int, runs: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    r = rng.standard_normal((n, 3, 3))
    m = ((r + r.transpose(0, 2, 1)) / 2).astype(np.float32)
    entries = [m[:, i, j].astype(np.float64) for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))]
    t: dict[str, list[float]] = {"eigvalsh": [], "closed_form": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        want = np.linalg.eigvalsh(m)
        t["eigvalsh"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        got = np.stack(symmetric_eigenvalues(*entries), 1)
        t["closed_form"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "matrices": n,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "speedup": round(med["eigvalsh"] / med["closed_form"], 2),
        "max_abs_error": float(np.abs(got - want).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scan", nargs="?", type=Path, help="a chest CT (NIfTI or DICOM series folder)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ctsparse" / "chest_0.7mm")
    ap.add_argument("--spacing", default=None, help="resample to this spacing first, e.g. 0.96,0.96,1.25")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--matrices", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    scan = args.scan or phantom_scan(args.cache)
    settings = list(LUNG_SETTINGS)
    if args.spacing:
        settings.append(f"preprocess.spacing=[{args.spacing}]")
    cfgs = {
        f"lung_grid_mm={g}": load_config(None, [*settings, f"preprocess.lung_grid_mm={g}"]).preprocess
        for g in ("null", "2.0")
    }
    volume = read_volume(scan)
    print(f"{scan}: {volume.shape} at {' x '.join(f'{s:.3g}' for s in volume.spacing)} mm", flush=True)
    result = {
        "scan": str(scan),
        "shape": list(volume.shape),
        "spacing": [round(float(s), 4) for s in volume.spacing],
        "settings": settings,
        "runs": args.runs,
        "machine": platform.processor() or platform.machine(),
        "sparsify": time_sparsify(volume, cfgs, args.runs),
        "eigenvalues": time_eigen(args.matrices, args.runs),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
