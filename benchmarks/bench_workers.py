"""Preprocessing in worker processes: first epoch and predict over a folder, 0/1/2 workers.

    python benchmarks/bench_workers.py --work /tmp/bench_workers --n 40 --runs 3
    python benchmarks/bench_workers.py --work /tmp/bench_big --n 24 --size 192x192x128 \\
        --stages prepare --json benchmarks/results/workers_192.json

Writes N DICOM phantoms once (`ctsparse phantoms WORK/data --format dicom`), then for each worker
count, runs interleaved (0, 1, 2, 0, 1, 2, ...) so that a change in the machine's load hits every
setting alike, each run with a cold cache (a fresh CTSPARSE_CACHE):
  prepare      ctsparse.prepare.prepare_scans over every scan (what `train` does before
               its first epoch), in this process;
  first_epoch  `ctsparse train DATA --epochs 1 --workers W --threads 1` as a subprocess, wall time
               (imports, decoding + sparsifying into the cache, one epoch, validation, checkpoints);
  predict      `ctsparse predict best.pt DATA --workers W --threads 1`, wall time.
Medians go to benchmarks/results/workers.json with each run's figures and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cache: Path) -> float:
    env = {**os.environ, "CTSPARSE_CACHE": str(cache), "COLUMNS": "200"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return seconds


def _prepare(data: Path, workers: int, cache: Path) -> float:
    from ctsparse.config import load_config
    from ctsparse.data.datasets import discover_dataset
    from ctsparse.prepare import prepare_scans

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    paths = [s.path for s in discover_dataset(data)]
    t0 = time.perf_counter()
    results = prepare_scans(paths, cfg.preprocess, str(cache), workers)
    seconds = time.perf_counter() - t0
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise SystemExit(f"{len(bad)} scans failed: {bad[0]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ctsparse_bench_workers")
    ap.add_argument("--n", type=int, default=40, help="number of DICOM phantoms")
    ap.add_argument("--size", default="96x96x64", help="phantom voxels XxYxZ (ctsparse phantoms --size)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    ap.add_argument("--stages", default="prepare,first_epoch,predict", help="what to time")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "workers.json")
    args = ap.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    stages = args.stages.split(",")
    if "predict" in stages and "first_epoch" not in stages:
        raise SystemExit("--stages: predict needs first_epoch (its checkpoint)")
    ctsparse = [sys.executable, "-m", "ctsparse"]
    data = args.work / "data"
    if not (data / "labels.csv").is_file():
        shutil.rmtree(data, ignore_errors=True)
        phantoms = [*ctsparse, "phantoms", str(data), "--n", str(args.n), "--size", args.size]
        _run([*phantoms, "--format", "dicom", "--seed", "11"], args.work)
    load_before = os.getloadavg()
    figures: dict[str, dict[int, list[float]]] = {k: {w: [] for w in counts} for k in stages}
    checkpoint = args.work / "ckpt.pt"
    demo = str(ROOT / "configs" / "demo.yaml")
    for run in range(args.runs):
        for w in counts:
            scratch = Path(tempfile.mkdtemp(dir=args.work, prefix=f"run{run}_w{w}_"))
            if "prepare" in stages:
                figures["prepare"][w].append(_prepare(data, w, scratch / "cache_prepare"))
            if "first_epoch" in stages:
                out = scratch / "run"
                train = [*ctsparse, "train", str(data), "--config", demo, "--out", str(out), "--epochs", "1"]
                train += ["--workers", str(w), "--threads", "1", "--device", "cpu"]
                figures["first_epoch"][w].append(_run(train, scratch / "cache_train"))
                if not checkpoint.exists():
                    shutil.copy(out / "best.pt", checkpoint)
            if "predict" in stages:
                predict = [*ctsparse, "predict", str(checkpoint), str(data), "--workers", str(w)]
                predict += ["--threads", "1", "--device", "cpu"]
                figures["predict"][w].append(_run(predict, scratch / "cache_predict"))
            shutil.rmtree(scratch)
            done = ", ".join(f"{k} {v[w][-1]:.2f} s" for k, v in figures.items())
            print(f"run {run + 1}/{args.runs} workers {w}: {done}", flush=True)
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "n_scans": args.n,
        "format": "dicom",
        "phantom_size": f"{args.size} (ctsparse phantoms: field of view and slice count varied per scan)",
        "config": "configs/demo.yaml",
        "runs": args.runs,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "seconds": {k: {str(w): v for w, v in per.items()} for k, per in figures.items()},
        "median_s": {k: {str(w): statistics.median(v) for w, v in per.items()} for k, per in figures.items()},
    }
    if 1 in counts:
        result["speedup_vs_1_worker"] = {
            k: {str(w): statistics.median(per[1]) / statistics.median(v) for w, v in per.items()}
            for k, per in figures.items()
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nmedians over {args.runs} runs, {args.n} DICOM phantoms {args.size}, cold cache:")
    print(f"{'stage':<12}" + "".join(f"{f'{w} workers':>14}" for w in counts))
    for k, per in figures.items():
        print(f"{k:<12}" + "".join(f"{statistics.median(per[w]):>12.2f} s" for w in counts))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
