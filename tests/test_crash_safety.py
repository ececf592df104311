"""Crash safety: SIGKILL and Ctrl-C of real training processes, torn history rows, the cache.

Whatever moment a run dies at, every file in runs/NAME/ must read back as valid, and --resume
must continue from the last complete checkpoint to the same end as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from run_helpers import SLOWER

from ctsparse.config import load_config
from ctsparse.training import history as hist

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

# batch 1: six steps per epoch, so a kill lands inside an epoch more often than between two
SETS = [
    "model.widths=[8, 16]",
    "model.depths=[1, 1]",
    "preprocess.features=patch",
    "train.batch_size=1",
    "train.warmup_epochs=0",
    "train.val_fraction=0.25",
    "train.patience=50",
]
EPOCHS = 6
TIMING = {"epoch_time_s", "sites_per_s", "peak_rss_mb", "peak_cuda_mb"}
RUN_FILES = {"best.pt", "last.pt", "history.csv", "config.yaml", "split.json", "metrics.json"}


def _cmd(data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    sets = [x for s in SETS for x in ("--set", s)]
    base = [sys.executable, "-m", "ctsparse", "train", str(data), "--out", str(out), "--device", "cpu"]
    base.append("--no-plan")  # the defaults plus SETS: a plan could time its way to another kernel
    return [*base, "--threads", "1", "--epochs", str(epochs), *sets, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200"}


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env())


def _wait_for_epochs(
    proc: subprocess.Popen[bytes], history: Path, n: int, timeout: float = 180, poll: float = 0.02
) -> float:
    """Poll until history.csv holds n epochs; returns the last epoch's duration in seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        rows = hist.read(history)
        if len(rows) >= n:
            return float(rows[-1]["epoch_time_s"])
        assert proc.poll() is None, f"training ended (rc {proc.returncode}) before epoch {n}"
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"no epoch {n} after {timeout} s")


def _strict_history(path: Path) -> list[dict[str, str]]:
    """The raw CSV, with every line required to be complete (no tolerant reader)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == hist.COLUMNS
        rows = list(reader)
    for r in rows:
        assert None not in r.values() and None not in r, r
        float(r["train_loss"])
    return rows


def _assert_run_files_valid(out: Path) -> int:
    """Every run file parses; returns the epoch last.pt holds."""
    from ctsparse.models.checkpoint import load_checkpoint

    last = load_checkpoint(out / "last.pt")
    load_checkpoint(out / "best.pt")
    yaml.safe_load((out / "config.yaml").read_text())
    json.loads((out / "split.json").read_text())
    epochs = [int(r["epoch"]) for r in _strict_history(out / "history.csv")]
    done = int(last.extra["epoch"])
    # history is written just before last.pt: it may hold one epoch more, never one fewer
    assert epochs in (list(range(1, done + 1)), list(range(1, done + 2))), (epochs, done)
    # a file killed mid-write is a hidden temp file, never one of the names above
    for p in out.iterdir():
        assert p.name in {*RUN_FILES, "curves.png", "confusion_matrix.png"} or (
            p.name.startswith(".") and p.name.endswith(".tmp")
        ), p.name
    return done


def _metrics(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = _start(_cmd(tiny_dataset, out, *SLOWER), tmp_path / "killed.log")
    epoch_s = _wait_for_epochs(proc, out / "history.csv", 2, poll=0.002)
    time.sleep(0.4 * epoch_s)  # into epoch 3's steps
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    done = _assert_run_files_valid(out)
    assert 2 <= done < EPOCHS

    res = subprocess.run(
        _cmd(tiny_dataset, out, *SLOWER, "--resume"), check=False, capture_output=True, text=True, env=_env()
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"resuming at epoch {done + 1}" in res.stdout
    assert _assert_run_files_valid(out) == EPOCHS
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # cleaned up on resume

    ref = tmp_path / "uninterrupted"
    res = subprocess.run(
        _cmd(tiny_dataset, ref, *SLOWER), check=False, capture_output=True, text=True, env=_env()
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert _metrics(_strict_history(out / "history.csv")) == _metrics(_strict_history(ref / "history.csv"))
    _assert_same_weights(out, ref)  # --threads 1: bit for bit, not just the printed digits


def _assert_same_weights(a: Path, b: Path) -> None:
    import torch

    from ctsparse.models.checkpoint import load_checkpoint

    for name in ("last.pt", "best.pt"):
        wa, wb = load_checkpoint(a / name).state_dict, load_checkpoint(b / name).state_dict
        assert wa.keys() == wb.keys(), name
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}: {key}"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_stops_cleanly_and_says_how_to_resume(
    tiny_dataset: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C, or a scheduler's SIGTERM, inside epoch 3: the step in progress finishes and is
    saved in last.pt, the process exits 130 with the resume command, and --resume finishes."""
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    proc = _start(_cmd(tiny_dataset, out, *SLOWER, epochs=4), log)
    epoch_s = _wait_for_epochs(proc, out / "history.csv", 2, poll=0.002)
    # epoch 3's six steps take most of an epoch (validation is two forward passes); epoch 2 is
    # past the first calls' warm-up, so a quarter of its time lands after step 1 of epoch 3
    time.sleep(0.25 * epoch_s)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 130
    text = log.read_text()
    assert "interrupted" in text and "--resume" in text and "Traceback" not in text, text
    assert _assert_run_files_valid(out) == 2
    from ctsparse.models.checkpoint import load_checkpoint

    partial = load_checkpoint(out / "last.pt").extra["partial"]
    assert partial is not None, "the signal did not land inside epoch 3's steps"
    assert partial["epoch"] == 3 and 1 <= partial["batches_done"] < 6
    assert f"epoch 2 + {partial['batches_done']} steps of epoch 3" in text
    res = subprocess.run(
        _cmd(tiny_dataset, out, *SLOWER, "--resume", epochs=4),
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert [int(r["epoch"]) for r in _strict_history(out / "history.csv")] == [1, 2, 3, 4]


@pytest.mark.usefixtures("one_thread")
def test_ctrl_c_mid_epoch_saves_that_step_and_resume_is_exact(tiny_dataset: Path, tmp_path: Path) -> None:
    """A real SIGINT (sent to this process) after step 1 of epoch 2; resuming finishes epoch 2 from
    step 2 and the run ends bit for bit where an uninterrupted run ends."""
    import torch

    from ctsparse.models.checkpoint import load_checkpoint
    from ctsparse.training.loop import train

    sets = [*SETS, "train.batch_size=2", "train.epochs=3"]
    full = train(tiny_dataset, tmp_path / "full", load_config(None, sets), device="cpu")

    def ctrl_c(kind: str, info: dict) -> None:  # type: ignore[type-arg]
        if kind == "batch" and (info["epoch"], info["batch"]) == (2, 1):
            os.kill(os.getpid(), signal.SIGINT)

    part = tmp_path / "part"
    stopped = train(tiny_dataset, part, load_config(None, sets), device="cpu", on_event=ctrl_c)
    assert stopped.interrupted and stopped.epochs_run == 1 and stopped.batches_into_next == 1
    extra = load_checkpoint(part / "last.pt").extra
    assert extra["epoch"] == 1 and extra["partial"]["batches_done"] == 1
    assert [r["epoch"] for r in hist.read(part / "history.csv")] == ["1"]

    resumed = train(tiny_dataset, part, load_config(None, sets), device="cpu", resume=True)
    assert not resumed.interrupted and resumed.epochs_run == full.epochs_run == 3
    assert _metrics(hist.read(part / "history.csv")) == _metrics(hist.read(tmp_path / "full" / "history.csv"))
    a = load_checkpoint(part / "last.pt").state_dict
    b = load_checkpoint(tmp_path / "full" / "last.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_history_reads_back_only_complete_rows(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    row = dict.fromkeys(hist.COLUMNS, "0.5")
    for epoch in (1, 2):
        hist.append(path, {**row, "epoch": epoch})
    with open(path, "a") as fh:  # what a writer killed mid-line would leave (the old append did)
        fh.write("3,0.001,0.69")
    assert [r["epoch"] for r in hist.read(path)] == ["1", "2"]
    hist.append(path, {**row, "epoch": 2})  # an epoch redone after a resume
    hist.truncate(path, 2)
    assert [r["epoch"] for r in _strict_history(path)] == ["1", "2"]


def test_truncated_cache_file_is_recomputed_not_read(tiny_dataset: Path, tmp_path: Path) -> None:
    import numpy as np

    from ctsparse.sparse_volume import load_sparse
    from ctsparse.sparsify import sparsify_cached

    cfg = load_config(None, SETS).preprocess
    scan = next(tiny_dataset.glob("*.nii.gz"))
    sv, hit = sparsify_cached(scan, cfg, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("*.npz")
    assert not hit
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])  # half a file, as a non-atomic writer would leave
    with pytest.raises(ValueError, match="invalid cache file"):
        load_sparse(cache)
    again, hit = sparsify_cached(scan, cfg, cache_dir=tmp_path)
    assert not hit
    assert np.array_equal(again.coords, sv.coords) and np.array_equal(again.feats, sv.feats)
    assert load_sparse(cache).n_sites == sv.n_sites  # rewritten whole


def test_cache_writer_killed_mid_write_leaves_the_old_file(tiny_dataset: Path, tmp_path: Path) -> None:
    """A real process SIGKILLed inside atomic_write: the cache entry it was replacing still reads
    back as the complete old file; the half-written bytes sit in a temp file nobody reads."""
    import numpy as np

    from ctsparse.sparsify import sparsify_cached

    cfg = load_config(None, SETS).preprocess
    scan = next(tiny_dataset.glob("*.nii.gz"))
    sv, _ = sparsify_cached(scan, cfg, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("*.npz")
    code = (
        "import os, signal, sys\n"
        "from ctsparse.fileio import atomic_write\n"
        "with atomic_write(sys.argv[1]) as fh:\n"
        "    fh.write(b'PK' + b'x' * 100000)\n"
        "    fh.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(cache)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(f".{cache.name}.*.tmp"))) == 1
    again, hit = sparsify_cached(scan, cfg, cache_dir=tmp_path)
    assert hit and np.array_equal(again.feats, sv.feats)


def test_a_scan_that_kills_its_worker_fails_alone() -> None:
    """A worker process really dies (SIGKILL) on one input: that input becomes an error, every
    other one (in flight with it or after it) is still processed, in order."""
    from proc_helpers import upper_or_die

    from ctsparse.prepare import imap_isolated

    names = ["a", "b", "c", "die", "d", "e", "f"]
    out = list(imap_isolated(upper_or_die, [(n,) for n in names], 2))
    assert out[:3] == ["A", "B", "C"] and out[4:] == ["D", "E", "F"]
    assert out[3].startswith("die: ") and "died" in out[3]
