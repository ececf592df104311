"""The CPU sparse path's GEMMs on oneDNN against torch.mm (MKL), paired in one process.

    python benchmarks/bench_onednn_gemm.py [--occupancies 5,40] [--rounds 7] [--threads 1]
        [--json benchmarks/results/onednn_gemm.json]

1. GEMM shapes of the classifier's layers (a gathered chunk times the kernel; a weight gradient
   as B^T A), each timed on torch.mm and on oneDNN's matmul (torch.ops.mkldnn._linear_pointwise),
   medians of 30 calls on the same shape: GFLOP/s.
2. The classifier tasks of benchmarks/bench_spconv.py (conv16, forward, train on its CT-like site
   sets) with models/sitegemm.ONEDNN on and off, the two taking turns for --rounds rounds after a
   warm-up of each (bench_engine_switch.paired): median milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_spconv  # the site sets and the tasks
from bench_engine_switch import paired  # two paths taking turns, medians

from ctsparse.device import set_threads
from ctsparse.models import sitegemm

# (rows, depth, columns): the stem (27 x 8 -> 16), a 16-channel and a 32-channel cube layer
# (27 x 16 -> 16, 27 x 32 -> 32), a 64-channel per-offset product, and two weight gradients
PRODUCTS = [(2427, 216, 16), (1213, 432, 16), (606, 864, 32), (2048, 64, 64)]
WEIGHT_GRADS = [(1213, 432, 8), (1213, 432, 16), (606, 864, 32)]


def _median_s(fn: Callable[[], Any], calls: int = 30) -> float:
    fn()
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _mm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> Callable[[], Any]:
    return lambda: torch.mm(a, w, out=out)


def _addmm(acc: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> Callable[[], Any]:
    return lambda: acc.addmm_(b.t(), a)


def _onednn(a: torch.Tensor, wt: torch.Tensor) -> Callable[[], Any]:
    return lambda: torch.ops.mkldnn._linear_pointwise(a, wt, None, "none", [], "")


def gemm_rows() -> list[dict[str, Any]]:
    rows = []
    for m, k, n in PRODUCTS:
        a, w = torch.randn(m, k), torch.randn(k, n)
        flops = 2 * m * k * n
        mm = _median_s(_mm(a, w, torch.empty(m, n)))
        dnn = _median_s(_onednn(a, w.t().contiguous()))
        rows.append({"product": f"({m}, {k}) @ ({k}, {n})", "mm_gflops": flops / mm / 1e9,
                     "onednn_gflops": flops / dnn / 1e9})  # fmt: skip
    for r, p, q in WEIGHT_GRADS:
        a, b = torch.randn(r, p), torch.randn(r, q)
        flops = 2 * r * p * q
        mm = _median_s(_addmm(torch.zeros(q, p), b, a))
        dnn = _median_s(_onednn(b.t(), a.t()))
        rows.append({"product": f"({q}, {r}) @ ({r}, {p}) (weight gradient)", "mm_gflops": flops / mm / 1e9,
                     "onednn_gflops": flops / dnn / 1e9})  # fmt: skip
    return rows


def task_row(case: dict[str, Any], task: str, rounds: int) -> dict[str, Any]:
    data = np.load(case["path"])
    coords, feats = torch.from_numpy(data["coords"]), torch.from_numpy(data["feats"])
    spec = {"task": task, "grid": list(bench_spconv.GRID), "engine": "ctsparse", "kernel": "cube"}
    fn = bench_spconv._ctsparse_task(spec, coords, feats)

    def run(onednn: bool) -> None:
        sitegemm.ONEDNN = onednn
        fn()

    with torch.enable_grad() if task == "train" else torch.no_grad():
        got = paired({"onednn": lambda: run(True), "mm": lambda: run(False)}, rounds)
    sitegemm.ONEDNN = True
    return {"occupancy": case["occupancy"], "sites": case["sites"], "task": task,
            "onednn_ms": 1000 * got["onednn"], "mm_ms": 1000 * got["mm"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--occupancies", default="5,40", help="percent")
    ap.add_argument("--tasks", default="conv16,forward,train")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not sitegemm.ONEDNN:
        raise SystemExit("this torch has no oneDNN matmul: nothing to compare")
    set_threads(args.threads)
    gemms = gemm_rows()
    for g in gemms:
        mm, dnn = g["mm_gflops"], g["onednn_gflops"]
        print(f"{g['product']:<44} torch.mm {mm:6.0f} GFLOP/s   oneDNN {dnn:6.0f} GFLOP/s")
    tasks = []
    with tempfile.TemporaryDirectory(prefix="bench-onednn-") as tmp:
        occupancies = [float(v) / 100 for v in args.occupancies.split(",")]
        cases = bench_spconv.make_cases(occupancies, bench_spconv.GRID, bench_spconv.CHANNELS, Path(tmp))
        for case in cases:
            for task in args.tasks.split(","):
                row = task_row(case, task, args.rounds)
                tasks.append(row)
                print(f"{100 * row['occupancy']:g} % {row['task']:<8} oneDNN {row['onednn_ms']:7.1f} ms   "
                      f"torch.mm {row['mm_ms']:7.1f} ms", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "gemms": gemms, "tasks": tasks}, indent=1))


if __name__ == "__main__":
    main()
