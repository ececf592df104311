"""Quality benchmark: sparse classifier vs its dense twin on phantoms, same data, same budget.

    python benchmarks/quality.py --work /tmp/ctsparse-quality [--n-train 300] [--n-test 100] [--minutes 20]

1. `ctsparse phantoms` makes a balanced training set (seed 1) and a held-out test set (seed 2).
2. `ctsparse train` trains the sparse model, then the dense twin, each with the same wall-clock
   budget (train.max_minutes) and the same config apart from model.backend.
3. `ctsparse predict` classifies the test set with each best.pt; accuracy is computed against the
   test labels. Each command runs in its own process, so peak RSS figures do not mix.
4. `--seeds 0,1,2` repeats steps 2-3 with each train.seed (initialisation, train/validation split,
   order, augmentation) on the same phantoms and reports every run and the median. Each finished
   run keeps run-BACKEND-sSEED/result.json and is not repeated, so an interrupted sweep resumes.
Writes results.json and a Markdown table to the work folder and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

CTSPARSE = [sys.executable, "-m", "ctsparse"]


def run(args: list[str]) -> float:
    print("+", " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(args, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--config", default="configs/phantom.yaml")
    ap.add_argument(
        "--phantom-spacing",
        default=None,
        help="voxel size of the generated phantoms, XxYxZ mm (default 3.65x3.65x5)",
    )
    ap.add_argument("--backends", default="sparse,dense")
    ap.add_argument(
        "--seeds",
        default="0",
        help="train.seed values, comma-separated: each seed is a full repeat (initialisation, "
        "train/validation split, order, augmentation) on the same phantoms; medians are reported",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--threads", type=int, default=None, help="torch threads per training process")
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="train the backends at the same time (1 thread each on a 2-core machine): both see the "
        "same machine load, which a sequential run on a shared machine cannot promise",
    )
    args = ap.parse_args()
    work: Path = args.work
    train_dir, test_dir = work / "train", work / "test"
    extra = ["--spacing", args.phantom_spacing] if args.phantom_spacing else []
    if not (train_dir / "labels.csv").exists():
        run([*CTSPARSE, "phantoms", str(train_dir), "--n", str(args.n_train), "--seed", "1", *extra])
    if not (test_dir / "labels.csv").exists():
        run([*CTSPARSE, "phantoms", str(test_dir), "--n", str(args.n_test), "--seed", "2", *extra])
    with open(test_dir / "labels.csv") as fh:
        truth = {str((test_dir / r["path"]).resolve()): r["label"] for r in csv.DictReader(fh)}

    seeds = [int(x) for x in args.seeds.split(",")]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        # one folder per (backend, seed); a finished run keeps its result.json and is not re-run,
        # so an interrupted sweep resumes where it stopped
        todo, trained = {}, {}
        for backend in args.backends.split(","):
            run_dir = work / f"run-{backend}-s{seed}"
            if (run_dir / "result.json").exists():
                results.setdefault(backend, {})[str(seed)] = json.loads((run_dir / "result.json").read_text())
            elif (run_dir / "train_wall.json").exists():  # trained, not yet evaluated
                trained[backend] = run_dir
            else:
                todo[backend] = run_dir
        procs = {}
        for backend, run_dir in todo.items():
            procs[backend] = start_training(args, train_dir, run_dir, backend, seed, work)
            if not args.parallel:
                procs[backend][0].wait()
        # wall time ends when each process exits, not when we get round to evaluating it
        ended: dict[str, float] = {}
        while len(ended) < len(procs):
            for backend, (proc, _, _) in procs.items():
                if backend not in ended and proc.poll() is not None:
                    ended[backend] = time.perf_counter()
            time.sleep(0.5)
        for backend, (proc, t0, log) in procs.items():
            log.close()
            if proc.returncode != 0:
                raise SystemExit(f"training {backend} (seed {seed}) failed: see {log.name}")
            (todo[backend] / "train_wall.json").write_text(json.dumps({"train_wall_s": ended[backend] - t0}))
        for backend, run_dir in {**trained, **todo}.items():
            train_s = json.loads((run_dir / "train_wall.json").read_text())["train_wall_s"]
            result = evaluate(args, run_dir, test_dir, truth, train_s)
            (run_dir / "result.json").write_text(json.dumps(result, indent=1))
            results.setdefault(backend, {})[str(seed)] = result
    (work / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (work / "results.md").write_text(table + "\n")
    print(table)


def start_training(
    args: argparse.Namespace, train_dir: Path, run_dir: Path, backend: str, seed: int, work: Path
) -> tuple[subprocess.Popen[bytes], float, IO[str]]:
    sets = [
        f"model.backend={backend}",
        f"train.max_minutes={args.minutes}",
        f"train.seed={seed}",
        *args.overrides,
    ]
    cmd = [*CTSPARSE, "train", str(train_dir), "--config", args.config, "--out", str(run_dir), "--overwrite"]
    cmd += [x for s in sets for x in ("--set", s)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("+", " ".join(cmd), flush=True)
    log = open(work / f"train-{backend}-s{seed}.log", "w")  # noqa: SIM115 - closed after wait()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.perf_counter(), log


def evaluate(
    args: argparse.Namespace, run_dir: Path, test_dir: Path, truth: dict[str, str], train_s: float
) -> dict[str, float]:
    with open(run_dir / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    pred_json = run_dir / "test_predictions.json"
    threads = ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(
        [*CTSPARSE, "predict", str(run_dir / "best.pt"), str(test_dir), "--out", str(pred_json), *threads],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not pred_json.exists():  # exit 1 with some failed scans still writes the file
        raise SystemExit(f"predict with {run_dir / 'best.pt'} failed: {done.stderr.strip()[-500:]}")
    rows = json.loads(pred_json.read_text())["rows"]
    ok = [r for r in rows if not r.get("error")]
    correct = sum(truth[str(Path(r["path"]).resolve())] == r["label"] for r in ok)
    return {
        "test_accuracy": correct / len(truth),
        "test_scans": len(truth),
        "failed": len(rows) - len(ok),
        "epochs": len(history),
        "train_wall_s": train_s,
        "train_peak_rss_mb": max(float(h["peak_rss_mb"]) for h in history),
        "val_accuracy_last": float(history[-1]["val_accuracy"]),
        "infer_model_s_median": statistics.median(r["time_model_s"] for r in ok),
        "infer_total_s_median": statistics.median(r["time_total_s"] for r in ok),
        "predict_peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "sites_median": statistics.median(r["sites"] for r in ok),
        "occupancy_median": statistics.median(r["occupancy"] for r in ok),
    }


def markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per (backend, seed), then the median over seeds of every column."""
    lines = [
        "| backend | seed | test accuracy | epochs in budget | train wall | train peak RSS "
        "| model time / scan (median) | predict total / scan | predict peak RSS "
        "| sites (median) | occupancy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for backend, by_seed in results.items():
        rows = list(by_seed.items())
        if len(rows) > 1:
            keys = rows[0][1].keys()
            rows.append(("median", {k: statistics.median(r[k] for r in by_seed.values()) for k in keys}))
        for seed, r in rows:
            lines.append(
                f"| {backend} | {seed} | {100 * r['test_accuracy']:.1f}% ({r['test_scans']:.0f} scans) "
                f"| {r['epochs']:.0f} | {r['train_wall_s'] / 60:.1f} min | {r['train_peak_rss_mb']:.0f} MB "
                f"| {1000 * r['infer_model_s_median']:.0f} ms | {1000 * r['infer_total_s_median']:.0f} ms "
                f"| {r['predict_peak_rss_mb']:.0f} MB | {r['sites_median']:.0f} "
                f"| {100 * r['occupancy_median']:.1f}% |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
