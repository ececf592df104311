"""How many threads should OpenBLAS (the BLAS behind ME's CPU convolution) get?

    python benchmarks/bench_blas_threads.py [--runs 7] [--json benchmarks/results/blas_threads.json]

The sparse model's forward pass on the benchmark phantom (bone threshold, configs/phantom.yaml
model with the cube kernel, 2^3 and 4^3 patches, 1.4 mm), for every (torch threads, OpenBLAS pool)
pair up to the core count, interleaved run by run so that machine noise hits every setting alike;
medians of --runs. torch threads also set ME's OpenMP loops (device.set_threads); the OpenBLAS
pool is then resized on its own with threadpoolctl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ctsparse.benchmark_sweep import phantom_at, threshold_cases
from ctsparse.config import load_config
from ctsparse.device import limit_blas_threads, set_threads
from ctsparse.models import create_model
from ctsparse.models.sparse import collate_sparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--spacing", type=float, default=1.4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    cfg = load_config("configs/phantom.yaml", ["model.kernel=cube"])
    vol = phantom_at(args.spacing)
    cases = {}
    for patch in (2, 4):
        pre = replace(cfg.preprocess, spacing=None, patch_size=patch)
        [(_, sv)] = threshold_cases(vol, pre, [200.0])
        cases[f"patch {patch}"] = sv
    settings = [(t, b) for t in range(1, cores + 1) for b in range(1, cores + 1)]
    times: dict[tuple[str, int, int], list[float]] = {}
    dev = torch.device("cpu")
    models = {}
    for name, sv in cases.items():
        torch.manual_seed(0)
        models[name] = create_model(cfg.model, sv.n_channels, 2).eval()
    with torch.no_grad():
        for run in range(args.runs + 1):  # run 0 warms up every setting
            for name, sv in cases.items():
                for t, b in settings:
                    set_threads(t)
                    limit_blas_threads(b)
                    t0 = time.perf_counter()
                    models[name](collate_sparse([sv], dev))
                    if run:
                        times.setdefault((name, t, b), []).append(time.perf_counter() - t0)
    rows = [
        {"case": name, "sites": cases[name].n_sites, "torch_threads": t, "blas_threads": b,
         "forward_s": statistics.median(v), "forward_all_s": v}
        for (name, t, b), v in times.items()
    ]  # fmt: skip
    for r in rows:
        print(
            f"{r['case']:>8} ({r['sites']:>6} sites)  torch/ME threads {r['torch_threads']}  "
            f"OpenBLAS {r['blas_threads']}: {1e3 * r['forward_s']:7.1f} ms"
        )
    if args.json:
        meta = {"runs": args.runs, "cores": cores, "spacing_mm": args.spacing, "load_end": os.getloadavg()}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
