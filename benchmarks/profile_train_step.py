"""Where a training epoch's time goes: cProfile of run_epoch on phantoms (one thread by default).

python benchmarks/profile_train_step.py [--n 32] [--threads 1] [--config configs/phantom.yaml]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import torch

from ctsparse.config import load_config
from ctsparse.data.phantoms import case_rng, make_phantom, phantom_labels
from ctsparse.device import set_threads
from ctsparse.models import create_model
from ctsparse.sparsify import sparsify
from ctsparse.training.epoch import run_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", default="configs/phantom.yaml")
    args = ap.parse_args()
    set_threads(args.threads)
    cfg = load_config(args.config, ["train.epochs=1"])
    labels = phantom_labels(args.n, 1)
    data = [
        (sparsify(make_phantom(label, case_rng(1, i)), cfg.preprocess), int(label == "nodule"))
        for i, label in enumerate(labels)
    ]
    model = create_model(cfg.model, data[0][0].n_channels, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    dev = torch.device("cpu")
    no_events = {"flag": False}
    run_epoch(model, data[:8], cfg, dev, opt, sched, loss_fn, rng, 1, lambda k, i: None, no_events)  # warm-up
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run_epoch(model, data, cfg, dev, opt, sched, loss_fn, rng, 1, lambda k, i: None, no_events)
    prof.disable()
    seconds = time.perf_counter() - t0
    sites = np.median([sv.n_sites for sv, _ in data])
    print(
        f"{args.n} scans (median {sites:.0f} sites) in {seconds:.2f} s: "
        f"{seconds / args.n:.3f} s per scan step"
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
