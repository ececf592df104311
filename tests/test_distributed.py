"""Data-parallel training on this machine: two gloo CPU processes, real torch.distributed.

What a second process must not change: after the same steps both ranks hold the same weights,
and two ranks on half of each batch end where one process on the whole batch ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

import torch
import torch.distributed as dist
from conftest import single_thread

from ctsparse.candidates import IGNORE
from ctsparse.config import load_config
from ctsparse.device import set_threads
from ctsparse.models import create_model
from ctsparse.models.checkpoint import load_checkpoint
from ctsparse.sparse_volume import SparseVolume
from ctsparse.training import distributed as ddp
from ctsparse.training.epoch import BallPool, run_epoch

WORLD = 2
# Global batch 4 -> 2 per rank; 8 samples -> 2 optimizer steps. Dropout is off because each rank
# has its own torch generator, so its masks cannot match a single process's. Augmentation stays
# on for the sparse cases (its parameters depend on the position in the epoch, not on the rank);
# the dense twin pads each batch to its largest grid, and the padding enters its BN statistics
# and its average pooling, so augmented (differently sized) scans would make a half batch differ
# from the whole one for reasons that are not DDP's: it trains on unaugmented same-size grids.
BASE = [
    "model.widths=[8, 16]",
    "model.depths=[1, 1]",
    "model.dropout=0",
    "preprocess.features=patch",
    "train.batch_size=4",
]
DENSE = [*BASE, "model.backend=dense", "augment.enabled=false"]
CASES: dict[str, list[str]] = {
    "dense": DENSE,
    "sparse": [*BASE, "model.backend=sparse"],
    "dense_plain_bn": [*DENSE, "train.sync_bn=false"],
    # batches of candidate balls drawn across the scans (training/epoch.py, BallPool)
    "sparse_balls": [
        *BASE,
        "model.backend=sparse",
        "model.candidates=2",
        "model.background=0",
        "train.balance=balls",
        "augment.orient_balls=true",
    ],
}
# float32 sums in another order (two half-batch sums + all_reduce vs one sum) over two SGD steps;
# measured differences are below 1e-6. SGD, not Adam: Adam's first steps are about lr * sign(g),
# which turns float noise on a near-zero gradient into a full-size difference in the weight.
RTOL, ATOL = 1e-4, 1e-5


def _samples() -> list[tuple[SparseVolume, int]]:
    """Eight small scans with unbalanced labels (5:3), so the class-weighted loss matters."""
    rng = np.random.default_rng(7)
    out = []
    for i, label in enumerate([0, 1, 0, 0, 1, 0, 0, 1]):
        mask = rng.random((12, 12, 12)) < 0.25 + 0.02 * i
        coords = np.ascontiguousarray(np.argwhere(mask), dtype=np.int32)
        feats = rng.normal(label * 0.3, 1.0, (len(coords), 8)).astype(np.float32)
        params = {"features": "patch", "patch_size": 2}
        out.append((SparseVolume(coords, feats, (12, 12, 12), np.eye(4), params), label))
    return out


def _marked(samples: list[tuple[SparseVolume, int]]) -> list[tuple[SparseVolume, int]]:
    """The scans with two candidate balls of 4 mm each (the last channel scores the sites), and
    each class-1 scan's finding at the strongest site: one finding ball per class-1 scan."""
    out = []
    for scan, label in samples:
        sv = replace(scan, params={**scan.params, "blob_candidate_mm": 4.0})
        if label == 1:
            peak = sv.coords[int(np.argmax(sv.feats[:, -1]))].astype(np.float64)
            sv = sv.with_findings(np.array([[*peak, 1.0]]))  # identity affine: site = mm
        out.append((sv, label))
    return out


def _one_epoch(case: str, d: ddp.Dist) -> dict[str, Any]:
    cfg = load_config(None, CASES[case])
    torch.manual_seed(0)
    model = create_model(cfg.model, 8, 2)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wrapped = ddp.wrap(model, d, torch.device("cpu"), sync_bn=cfg.train.sync_bn)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor([0.8, 4 / 3]))  # "balance: loss" for 5:3
    rng = np.random.default_rng(0)
    data, pool, ball_loss_fn = _samples(), None, None
    if cfg.train.balance == "balls":
        data = _marked(data)
        pool = BallPool.of(data, cfg)
        ball_loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    tr = run_epoch(
        wrapped, data, cfg, torch.device("cpu"), opt, sched, loss_fn, rng, 1,
        lambda kind, info: None, {"flag": False}, dist=d, pool=pool, ball_loss_fn=ball_loss_fn,
    )  # fmt: skip
    raw = ddp.unwrap(wrapped)
    own = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    ddp.average_bn_buffers(raw, d)  # what the train loop does before validating and saving
    state = {k: v.detach().clone() for k, v in raw.state_dict().items()}
    return {"state": state, "own": own, "init": init, "train": tr}


def _worker(rank: int, store: str, out: str) -> None:
    set_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        d = ddp.Dist(rank=rank, world=WORLD, local_rank=rank, local_world=WORLD)
        torch.save({case: _one_epoch(case, d) for case in CASES}, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # tear gloo down together (see distributed.cleanup)
    finally:
        dist.destroy_process_group()
    # skip the interpreter's teardown, where torch 2.13 + gloo sometimes aborts (cli/train.py)
    os._exit(0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each case trained for one epoch by two spawned gloo ranks and by one process."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    with single_thread():
        single = {case: _one_epoch(case, ddp.Dist()) for case in CASES}
    return {"ranks": ranks, "single": single}


@pytest.mark.parametrize("case", list(CASES))
def test_both_ranks_hold_identical_weights_after_the_steps(runs: dict[str, Any], case: str) -> None:
    a, b = (r[case]["state"] for r in runs["ranks"])
    assert a.keys() == b.keys()
    for key in a:  # BN running statistics too: synced, or averaged over the ranks
        assert torch.equal(a[key], b[key]), key
    # and both report the epoch's figures reduced over the ranks, not their own half
    tr0, tr1 = (r[case]["train"] for r in runs["ranks"])
    assert (tr0["loss"], tr0["accuracy"]) == (tr1["loss"], tr1["accuracy"])


@pytest.mark.parametrize("case", ["dense", "sparse", "sparse_balls"])
def test_two_ranks_on_half_batches_match_one_process_on_whole_batches(
    runs: dict[str, Any], case: str
) -> None:
    """Exact up to float summation order because SyncBN gives both ranks the whole batch's BN
    statistics and the loss is normalised by the whole batch's class weights (see batch_loss).
    Every tensor of the state is compared, BatchNorm running statistics included; the sparse
    network pools with its own global_avg_max."""
    ranked, single = runs["ranks"][0][case], runs["single"][case]
    assert any("running_mean" in k for k in single["state"])
    for key, value in single["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(ranked["state"][key], value, rtol=RTOL, atol=ATOL, msg=key)
        else:
            assert torch.equal(ranked["state"][key], value), key
    # and training moved the weights far more than the tolerance
    moved = max(float((single["state"][k] - v).abs().max()) for k, v in single["init"].items())
    assert moved > 100 * ATOL
    assert ranked["train"]["loss"] == pytest.approx(single["train"]["loss"], rel=RTOL)
    assert ranked["train"]["accuracy"] == single["train"]["accuracy"]


def test_without_sync_bn_half_batches_do_not_match(runs: dict[str, Any]) -> None:
    """The control: with per-rank BatchNorm the ranks normalise with half-batch statistics, so
    the comparison above is sensitive to which samples each rank saw."""
    ranked, single = runs["ranks"][0]["dense_plain_bn"], runs["single"]["dense_plain_bn"]
    diff = max(
        float((ranked["state"][k] - v).abs().max()) for k, v in single["state"].items() if "weight" in k
    )
    assert diff > 100 * ATOL


def test_without_sync_bn_running_statistics_are_averaged_over_ranks(runs: dict[str, Any]) -> None:
    """sync_bn: false: each rank's running mean/var saw only its half of the batches; before a
    validation they become the mean over the ranks (ddp.average_bn_buffers)."""
    a, b = (r["dense_plain_bn"] for r in runs["ranks"])
    keys = [k for k in a["state"] if k.endswith(("running_mean", "running_var"))]
    assert keys
    assert any(not torch.equal(a["own"][k], b["own"][k]) for k in keys)  # the halves differ
    for key in keys:
        assert torch.equal(a["state"][key], b["state"][key]), key
        torch.testing.assert_close(a["state"][key], (a["own"][key] + b["own"][key]) / 2, msg=key)


def _history(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_torchrun_two_processes_train_then_resume(tiny_dataset: Path, tmp_path: Path) -> None:
    """`torchrun -m ctsparse train`, then `ctsparse train --nproc 2 --resume` extends it."""
    out = tmp_path / "run"
    sets = [
        "model.widths=[8, 16]",
        "model.depths=[1, 1]",
        "preprocess.features=patch",
        "train.batch_size=4",
        "train.warmup_epochs=0",
        "train.val_fraction=0.25",
    ]
    args = [str(tiny_dataset), "--out", str(out), "--device", "cpu", "--threads", "1", "--epochs", "2"]
    args.append("--no-plan")  # under torchrun without --config a rank must not plan alone
    args += [x for s in sets for x in ("--set", s)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    res = _run([*torchrun, "-m", "ctsparse", "train", *args])
    assert res.returncode == 0, res.stdout + res.stderr
    # rank 0 alone talks: one summary table, one line per epoch
    assert res.stdout.count("best epoch") == 1, res.stdout
    assert res.stdout.count("epoch   1  train loss") == 1, res.stdout
    assert "processes 2 (batch 2 per process)" in res.stdout
    names = {p.name for p in out.iterdir()}
    assert names == {
        "best.pt", "last.pt", "config.yaml", "history.csv", "metrics.json", "split.json",
        "curves.png", "confusion_matrix.png",
    }  # fmt: skip
    assert [r["epoch"] for r in _history(out / "history.csv")] == ["1", "2"]
    last = load_checkpoint(out / "last.pt")
    assert last.extra["epoch"] == 2 and last.extra["world"] == 2
    assert len(last.extra["torch_rng_ranks"]) == 2
    assert not any(k.startswith("module.") for k in last.state_dict)  # the unwrapped model
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    # each rank predicted one of the two validation scans; the metrics are over both
    assert metrics["n"] == len(split["val"]) == 2
    assert sum(map(sum, metrics["confusion_matrix"])) == 2

    res = _run(
        [sys.executable, "-m", "ctsparse", "train", str(tiny_dataset), "--out", str(out), "--nproc", "2",
         "--resume", "--epochs", "3", "--threads", "1"]
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming at epoch 3" in res.stdout
    assert [r["epoch"] for r in _history(out / "history.csv")] == ["1", "2", "3"]
    assert load_checkpoint(out / "last.pt").extra["epoch"] == 3
