"""Where engine `sparse` should switch from MinkowskiEngine to ctsparse's CPU kernels.

    python benchmarks/bench_engine_switch.py [--sites 100,1000,3000,6000,10000,20000] [--runs 9]
        [--threads 1] [--json benchmarks/results/engine_switch.json]

For each setting (the default configuration: cross kernel on 4^3 patches, 64 channels; and the cube
kernel on 2^3 patches, 8 channels) a chest phantom is sparsified with that setting's preprocessing
and cut down to the N sites nearest its centre (a compact block of anatomy, as a small scan or a
crop gives). The same network, with the same weights, runs on both paths in one process, the two
taking turns run by run (medians of --runs after a warm-up): `minkowski` (ME 0.5.4's CPU backend)
and `kernels` (models/siteconv), for a no-gradient forward pass in eval mode (predict, evaluate) and
a training step (forward + backward, a batch of one). Every run collates from the sparse volume, so
maps are built each time. models/sparse.CPU_KERNEL_MIN_SITES is set from where `kernels` becomes
the faster one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctsparse.collate import collate
from ctsparse.config import Config, load_config
from ctsparse.data.phantoms import case_rng, make_phantom
from ctsparse.device import set_threads
from ctsparse.models import create_model, sparse
from ctsparse.sparse_volume import SparseVolume
from ctsparse.sparsify import sparsify

SETTINGS = {
    "cross, 4^3 patches (default)": [],
    "cube, 2^3 patches": ["preprocess.patch_size=2", "model.kernel=cube"],
}


def nearest_sites(sv: SparseVolume, n: int) -> SparseVolume:
    """The n sites nearest the site set's centre, in their original order."""
    d = ((sv.coords - sv.coords.mean(0)) ** 2).sum(1)
    keep = np.sort(np.argsort(d, kind="stable")[:n])
    coords, feats = np.ascontiguousarray(sv.coords[keep]), np.ascontiguousarray(sv.feats[keep])
    return replace(sv, coords=coords, feats=feats)


def paired(fns: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(runs):
        for name in names[r % 2 :] + names[: r % 2]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_paths(
    model: torch.nn.Module, cfg: Config, sv: SparseVolume, task: str, runs: int
) -> dict[str, float]:
    """Milliseconds of `task` on ME and on ctsparse's kernels, the two taking turns."""
    cpu = torch.device("cpu")
    model.train(task == "train")

    def run(threshold: int) -> None:
        sparse.CPU_KERNEL_MIN_SITES = threshold
        x = collate([sv], None, cfg.model, cpu).inputs
        if task == "forward":
            with torch.no_grad():
                model(x)
            return
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), torch.zeros(1, dtype=torch.long))
        loss.backward()  # type: ignore[no-untyped-call]

    got = paired({"minkowski": lambda: run(1 << 62), "kernels": lambda: run(0)}, runs)
    return {k: round(v * 1000, 2) for k, v in got.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", default="100,1000,3000,6000,10000,20000")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    set_threads(args.threads)
    rows = []
    for setting, overrides in SETTINGS.items():
        cfg = load_config(None, overrides)
        full = sparsify(make_phantom("nodule", case_rng(0, 0), spacing=(1.0, 1.0, 1.0)), cfg.preprocess)
        torch.manual_seed(0)
        model = create_model(cfg.model, full.n_channels, 2)
        for n in (int(v) for v in args.sites.split(",")):
            if n > full.n_sites:
                print(f"{setting}: the phantom has {full.n_sites} sites, fewer than {n}")
                continue
            sv = nearest_sites(full, n)
            row: dict[str, Any] = {"setting": setting, "sites": n, "channels": full.n_channels}
            for task in ("forward", "train"):
                row[task] = time_paths(model, cfg, sv, task, args.runs)
            rows.append(row)
            f, t = row["forward"], row["train"]
            print(
                f"{setting}: {n:>6} sites  forward ME {f['minkowski']:.1f} ms, kernels {f['kernels']:.1f} ms;"
                f"  train ME {t['minkowski']:.1f} ms, kernels {t['kernels']:.1f} ms",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
