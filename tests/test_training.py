"""The learning path end to end on tiny real phantom files: overfit, resume, train -> predict."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctsparse.cli.main import app
from ctsparse.config import load_config
from ctsparse.models import create_model
from ctsparse.training.loop import train

# small and fast: the point is the learning path, not accuracy
TINY_TRAIN = [
    "model.widths=[8, 16]",
    "model.depths=[1, 1]",
    "preprocess.features=patch",
    "train.batch_size=4",
    "train.warmup_epochs=0",
]

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_tiny_model_overfits_a_handful_of_phantoms(tiny_dataset: Path, tmp_path: Path, backend: str) -> None:
    cfg = load_config(
        None,
        [
            *TINY_TRAIN,
            f"model.backend={backend}",
            "augment.enabled=false",
            "train.val_fraction=0",
            "train.epochs=25",
            "train.lr=0.01",
            "model.dropout=0",
            "train.metric=loss",
            "train.patience=25",
        ],
    )
    result = train(tiny_dataset, tmp_path / "run", cfg, device="cpu")
    rows = _history(tmp_path / "run" / "history.csv")
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])
    assert result.metrics["evaluated_on"].startswith("training")
    assert result.metrics["accuracy"] == 1.0, result.metrics


def _history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class _Crash(Exception):
    pass


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("average", [[], ["train.ema_epochs=1"]], ids=["weights", "ema"])
def test_resume_continues_where_it_stopped(tiny_dataset: Path, tmp_path: Path, average: list[str]) -> None:
    """A run that dies right after an epoch's checkpoint, resumed, ends bit for bit where an
    uninterrupted run ends (one thread: ME's CPU kernels are deterministic only there), with or
    without a moving average of the weights."""
    import torch

    from ctsparse.models.checkpoint import load_checkpoint

    cfg = [*TINY_TRAIN, "train.val_fraction=0.25", "train.patience=10", "train.epochs=4", *average]
    full = train(tiny_dataset, tmp_path / "full", load_config(None, cfg), device="cpu")

    def crash_after_epoch_2(kind: str, info: dict) -> None:  # type: ignore[type-arg]
        if kind == "epoch_end" and info["epoch"] == 2:
            raise _Crash  # dies right after last.pt of epoch 2 was written

    part = tmp_path / "part"
    with pytest.raises(_Crash):
        train(tiny_dataset, part, load_config(None, cfg), device="cpu", on_event=crash_after_epoch_2)
    assert [r["epoch"] for r in _history(part / "history.csv")] == ["1", "2"]
    resumed = train(tiny_dataset, part, load_config(None, cfg), device="cpu", resume=True)
    assert resumed.epochs_run == full.epochs_run == 4
    a = _history(tmp_path / "full" / "history.csv")
    b = _history(part / "history.csv")
    assert [r["epoch"] for r in b] == ["1", "2", "3", "4"]
    assert _untimed(a) == _untimed(b)  # every loss, lr and metric, to the written digit
    for name in ("last.pt", "best.pt"):
        wa = load_checkpoint(tmp_path / "full" / name).state_dict
        wb = load_checkpoint(part / name).state_dict
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_ema_weights_are_the_ones_judged_and_kept(tiny_dataset: Path, tmp_path: Path) -> None:
    """train.ema_epochs: best.pt holds the moving average as it was at its epoch (the one
    validation judged), not the last step's weights, and last.pt carries both for resuming."""
    import torch

    from ctsparse.models.checkpoint import load_checkpoint

    run = tmp_path / "run"
    seen: list[int] = []
    steps: list[int] = []

    def check(kind: str, info: dict) -> None:  # type: ignore[type-arg]
        if kind == "batch":
            steps.append(info["n_batches"])
        if kind != "epoch_end" or not info["improved"]:
            return
        best, last = load_checkpoint(run / "best.pt"), load_checkpoint(run / "last.pt")
        average = last.extra["ema"]
        assert average["n"] == len(steps)  # one update per step so far
        assert all(torch.equal(v, average["weights"][k]) for k, v in best.state_dict.items())
        moved = [k for k, v in best.state_dict.items() if v.is_floating_point()]
        assert any(not torch.equal(best.state_dict[k], last.state_dict[k]) for k in moved)
        seen.append(info["epoch"])

    cfg = [*TINY_TRAIN, "train.val_fraction=0.25", "train.epochs=3", "train.ema_epochs=2"]
    train(tiny_dataset, run, load_config(None, cfg), device="cpu", on_event=check)
    assert seen and seen[0] == 1


TIMING = {"epoch_time_s", "sites_per_s", "peak_rss_mb", "peak_cuda_mb"}


def _untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_time_budget_stops_at_an_epoch_boundary(tiny_dataset: Path, tmp_path: Path) -> None:
    """train.max_minutes: the run stops at the first epoch boundary where one more epoch would
    overrun the budget, with complete files and a result like any finished run."""
    events: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    cfg = load_config(None, [*TINY_TRAIN, "train.epochs=6", "train.max_minutes=0.0001"])  # 6 ms
    result = train(
        tiny_dataset, tmp_path / "run", cfg, device="cpu", on_event=lambda k, i: events.append((k, i))
    )
    kinds = [k for k, _ in events]
    assert result.epochs_run == 1 and not result.interrupted
    assert kinds.count("epoch_end") == 1 and "budget_stop" in kinds and kinds[-1] == "done"
    (stop,) = [i for k, i in events if k == "budget_stop"]
    assert stop["epoch"] == 1 and stop["minutes"] > 0.0001
    assert [r["epoch"] for r in _history(tmp_path / "run" / "history.csv")] == ["1"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_epoch"] == 1
    # without the budget the same run goes on past epoch 1: the budget is what stopped it
    events.clear()
    cfg = load_config(None, [*TINY_TRAIN, "train.epochs=2"])
    assert train(tiny_dataset, tmp_path / "free", cfg, device="cpu").epochs_run == 2


@pytest.mark.slow
def test_train_workers_fill_the_cache_from_class_folders(tiny_dataset: Path, tmp_path: Path) -> None:
    """`train --workers 2` on a DATA/<class>/ layout with one corrupt scan: the spawned workers
    fill the cache with exactly what an in-process sparsify makes, the bad scan is a skipped row,
    split.json is the seeded stratified split of the readable scans, and the run is the run
    without workers (each scan paired with its own label)."""
    import numpy as np

    from ctsparse.data.datasets import discover_dataset, stratified_split
    from ctsparse.io import read_volume
    from ctsparse.sparsify import sparsify, sparsify_cached

    data = tmp_path / "data"
    for row in _history(tiny_dataset / "labels.csv"):  # any CSV
        (data / row["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_dataset / row["path"], data / row["label"] / row["path"])
    (data / "normal" / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    out = tmp_path / "run"
    sets = [x for s in [*TINY_TRAIN, "train.epochs=1", "train.val_fraction=0.25"] for x in ("--set", s)]
    args = ["train", str(data), "--device", "cpu", "--no-plan", "--threads", "1", *sets]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--workers", "2"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "serial"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert _untimed(_history(out / "history.csv")) == _untimed(_history(tmp_path / "serial" / "history.csv"))
    split = json.loads((out / "split.json").read_text())
    assert len(split["skipped"]) == 1 and "broken.nii.gz" in split["skipped"][0]
    cfg = load_config(None, [*TINY_TRAIN, "train.val_fraction=0.25"])
    readable = [s for s in discover_dataset(data) if s.path.name != "broken.nii.gz"]
    train_s, val_s = stratified_split(readable, cfg.train.val_fraction, cfg.train.seed)
    assert split["train"] == [str(s.path) for s in train_s] and split["val"] == [str(s.path) for s in val_s]
    assert {Path(p).parent.name for p in split["val"]} == {"normal", "nodule"}
    cache = Path(os.environ["CTSPARSE_CACHE"]) / "sparse"
    assert len(list(cache.glob("*.npz"))) == 8
    for sample in readable:
        cached, hit = sparsify_cached(sample.path, cfg.preprocess)
        fresh = sparsify(read_volume(sample.path), cfg.preprocess)
        assert hit, sample.path  # written by a worker, under the key this process computes
        assert np.array_equal(cached.coords, fresh.coords) and np.array_equal(cached.feats, fresh.feats)


def test_cli_train_then_predict_in_process(tiny_dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run"
    sets = [x for s in [*TINY_TRAIN, "train.epochs=2"] for x in ("--set", s)]
    args = ["train", str(tiny_dataset), "--out", str(out), "--device", "cpu", "--no-plan"]
    res = runner.invoke(app, [*args, *sets])
    assert res.exit_code == 0, res.output
    for name in (
        "best.pt",
        "last.pt",
        "config.yaml",
        "history.csv",
        "metrics.json",
        "curves.png",
        "confusion_matrix.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["auroc_per_class"]) == {"normal", "nodule"}
    assert len(metrics["confusion_matrix"]) == 2

    # --resume of a finished run without --epochs does nothing more; with --epochs it extends it
    res = runner.invoke(app, ["train", str(tiny_dataset), "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in _history(out / "history.csv")] == ["1", "2"]
    res = runner.invoke(app, ["train", str(tiny_dataset), "--out", str(out), "--resume", "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in _history(out / "history.csv")] == ["1", "2", "3"]

    # an existing run is not overwritten silently
    again = runner.invoke(app, ["train", str(tiny_dataset), "--out", str(out), *sets])
    assert again.exit_code == 1 and "--resume" in again.output

    # predict on the folder plus one corrupt and one missing input: the rest is still predicted
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    pred = tmp_path / "pred.json"
    res = runner.invoke(
        app,
        [
            "predict",
            str(out / "best.pt"),
            str(tiny_dataset),
            str(bad),
            str(tmp_path / "missing.nii.gz"),
            "--out",
            str(pred),
            "--batch-size",
            "3",
        ],
    )
    assert res.exit_code == 1, res.output
    rows = json.loads(pred.read_text())["rows"]
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 8 and len(rows) == 10
    # rows come back in input order even though batches of 3 finish out of order
    assert [Path(r["path"]).name for r in rows][-2:] == ["bad.nii.gz", "missing.nii.gz"]
    assert [r["path"] for r in ok] == sorted(r["path"] for r in ok)
    for r in ok:
        assert r["label"] in ("normal", "nodule")
        assert r["p_normal"] + r["p_nodule"] == pytest.approx(1.0, abs=1e-5)
        assert r["time_model_s"] > 0 and r["peak_rss_mb"] > 0 and r["sites"] > 0
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert "bad.nii.gz" in errors["bad.nii.gz"]
    assert "no such file" in errors["missing.nii.gz"]
    assert "Traceback" not in res.output


@pytest.mark.usefixtures("one_thread")
def test_same_seed_same_data_same_config_gives_the_same_metrics(tiny_dataset: Path, tmp_path: Path) -> None:
    """CPU runs on one thread are deterministic: shuffling, augmentation and dropout all come from
    the seed. (With more threads ME's CPU kernels are not bitwise reproducible: README.)"""
    import torch

    from ctsparse.models.checkpoint import load_checkpoint

    timing = {"epoch_time_s", "sites_per_s", "peak_rss_mb", "peak_cuda_mb"}
    cfg = [*TINY_TRAIN, "train.val_fraction=0.25", "train.epochs=3", "augment.enabled=true"]
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("other_seed", 6)):
        train(tiny_dataset, tmp_path / name, load_config(None, [*cfg, f"train.seed={seed}"]), device="cpu")
        runs[name] = [
            {k: v for k, v in r.items() if k not in timing} for r in _history(tmp_path / name / "history.csv")
        ]
    assert len(runs["a"]) == 3
    assert runs["a"] == runs["b"]  # every per-epoch loss and metric, to the printed digit
    assert runs["a"] != runs["other_seed"]  # the control: the seed does reach the run
    wa = load_checkpoint(tmp_path / "a" / "last.pt").state_dict
    wb = load_checkpoint(tmp_path / "b" / "last.pt").state_dict
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.usefixtures("one_thread")
def test_predict_with_worker_processes_gives_the_same_rows(tiny_dataset: Path, tmp_path: Path) -> None:
    """Workers only read and sparsify: the rows equal the in-process ones. One thread for the
    model in both runs: a scan of the validation split sits exactly on the fitted threshold, and
    another BLAS or OpenMP thread count changes its probability in the last bit."""
    from ctsparse.predict import predict

    train(tiny_dataset, tmp_path / "run", load_config(None, [*TINY_TRAIN, "train.epochs=1"]), device="cpu")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    inputs = [str(bad), str(tiny_dataset), str(tmp_path / "missing.nii.gz")]
    serial = predict(tmp_path / "run" / "best.pt", inputs, device="cpu", batch_size=3)
    res = CliRunner().invoke(
        app,
        ["predict", str(tmp_path / "run" / "best.pt"), *inputs, "--workers", "2", "--batch-size", "3",
         "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "p.json")],
    )  # fmt: skip
    assert res.exit_code == 1, res.output  # the bad and the missing input
    pooled = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["path"] for r in pooled] == [r["path"] for r in serial]  # input order
    assert len(pooled) == 10 and [bool(r["error"]) for r in pooled] == [True, *[False] * 8, True]
    for a, b in zip(serial, pooled, strict=True):
        assert a["error"] == b["error"]
        if not a["error"]:
            assert (a["label"], a["sites"]) == (b["label"], b["sites"])
            assert a["p_nodule"] == pytest.approx(b["p_nodule"], abs=1e-6)
            assert b["time_read_s"] > 0 and b["time_preprocess_s"] > 0


def test_predict_with_incompatible_or_missing_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(tmp_path / "nope.pt"), str(tiny_dataset)])
    assert res.exit_code == 1
    assert "nope.pt" in res.output and "not found" in res.output and "Traceback" not in res.output
    junk = tmp_path / "junk.pt"
    shutil.copy(next(tiny_dataset.glob("*.nii.gz")), junk)
    res = runner.invoke(app, ["predict", str(junk), str(tiny_dataset)])
    assert res.exit_code == 1 and "junk.pt" in res.output and "Traceback" not in res.output


def test_bad_config_key_is_one_line(tiny_dataset: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app, ["train", str(tiny_dataset), "--out", str(tmp_path / "r"), "--set", "train.epoch=3"]
    )
    assert res.exit_code == 1
    assert "train.epoch" in res.output and "unknown key" in res.output and "Traceback" not in res.output


def _no_cuda_reason() -> str | None:
    import MinkowskiEngine as ME
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device (none on this machine)"
    if not ME.is_cuda_available():
        return "MinkowskiEngine is a CPU-only build: rebuild it with CUDA (docs/minkowskiengine.md)"
    return None


NO_CUDA = _no_cuda_reason()


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")
@pytest.mark.parametrize("kernel", ["cube", "cross"])
def test_train_and_predict_on_cuda(tiny_dataset: Path, tmp_path: Path, kernel: str) -> None:
    cfg = load_config(None, [*TINY_TRAIN, "train.epochs=1", f"model.kernel={kernel}"])
    train(tiny_dataset, tmp_path / "run", cfg, device="cuda")
    from ctsparse.predict import predict

    rows = predict(tmp_path / "run" / "best.pt", [tiny_dataset], device="cuda")
    assert len(rows) == 8
    assert all(not r["error"] and r["peak_cuda_mb"] > 0 for r in rows)


@pytest.mark.slow
def test_learning_path_generalizes_on_a_find_the_block_task() -> None:
    """Held-out accuracy, not just fitting: class 1 hides a solid 4^3 block in random clutter."""
    import numpy as np
    import torch

    from ctsparse.sparse_volume import SparseVolume
    from ctsparse.training.epoch import evaluate, run_epoch

    def make(n: int, seed: int) -> list[tuple[SparseVolume, int]]:
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            mask = rng.random((24, 24, 24)) < 0.15
            if i % 2:
                c = rng.integers(5, 19, 3)
                mask[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2, c[2] - 2 : c[2] + 2] = True
            coords = np.ascontiguousarray(np.argwhere(mask), dtype=np.int32)
            feats = (rng.normal(0, 0.3, (len(coords), 8)) + 0.5).astype(np.float32)
            out.append(
                (
                    SparseVolume(
                        coords, feats, (24, 24, 24), np.eye(4), {"features": "patch", "patch_size": 2}
                    ),
                    i % 2,
                )
            )
        return out

    cfg = load_config(
        None,
        [
            "model.widths=[8, 16, 32]",
            "model.depths=[1, 1, 1]",
            "train.lr=0.001",
            "model.kernel=cross",
            "preprocess.features=patch",
        ],
    )
    torch.manual_seed(0)
    model = create_model(cfg.model, 8, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    train_set, val_set = make(120, 1), make(60, 2)
    for epoch in range(1, 7):
        run_epoch(
            model,
            train_set,
            cfg,
            torch.device("cpu"),
            opt,
            sched,
            loss_fn,
            rng,
            epoch,
            lambda k, i: None,
            {"flag": False},
        )
    metrics = evaluate(model, val_set, cfg, torch.device("cpu"), loss_fn, ["clutter", "block"])
    assert metrics["accuracy"] >= 0.9, metrics


def test_the_best_epoch_is_the_highest_score_and_among_ties_the_lowest_validation_loss(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """On a small validation set accuracy moves in steps of 1/n and epochs tie; best.pt is the
    epoch with the highest train.metric and, among those, the lowest validation loss."""
    cfg = load_config(None, [*TINY_TRAIN, "train.val_fraction=0.4", "train.epochs=5", "train.patience=5"])
    train(tiny_dataset, tmp_path / "run", cfg, device="cpu")
    rows = _history(tmp_path / "run" / "history.csv")
    scores = [(float(r["val_balanced_accuracy"]), -float(r["val_loss"]), -int(r["epoch"])) for r in rows]
    expected = -max(scores)[2]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["best_epoch"] == expected
    assert len({s[0] for s in scores}) < len(scores), "no tie among the epochs: the case is not exercised"
