"""`train --resume` with --set / --epochs / --config: keys that may change are applied, the others
are refused naming the key before any file of the run is touched."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctsparse.cli.main import app
from ctsparse.config import load_config
from ctsparse.errors import ConfigError
from ctsparse.training.resume import RESUMABLE, explicit_keys, resume_config

TINY = ["model.widths=[8, 16]", "model.depths=[1, 1]", "preprocess.features=patch", "train.batch_size=4"]
TINY += ["train.warmup_epochs=0", "train.epochs=1", "augment.enabled=false"]


def test_resume_config_applies_allowed_keys_and_refuses_the_others(tmp_path: Path) -> None:
    saved = load_config(None, TINY)
    asked = load_config(None, [*TINY, "train.epochs=3", "data.workers=2", "train.patience=1"])
    out = resume_config(saved, asked, ["train.epochs", "data.workers", "train.patience", "model.widths"])
    assert (out.train.epochs, out.data.workers, out.train.patience) == (3, 2, 1)
    assert saved.train.epochs == 1  # the checkpoint's config object is not changed
    with pytest.raises(ConfigError, match=r"train\.lr.*cannot change on --resume") as err:
        resume_config(saved, load_config(None, [*TINY, "train.lr=0.5"]), ["train.lr"])
    assert "\n" not in str(err.value)
    # the same command line again with --resume: equal values are fine whatever the key
    assert (
        resume_config(saved, load_config(None, TINY), ["train.lr", "model.widths"]).train.lr == saved.train.lr
    )
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 0.01\nmodel:\n  widths: [8, 16]\n")
    assert explicit_keys(cfg_file, ["data.workers=1"]) == ["train.lr", "model.widths", "data.workers"]
    assert "train.lr" not in RESUMABLE and "preprocess.spacing" not in RESUMABLE


def _epochs(run: Path) -> list[str]:
    with open(run / "history.csv", newline="") as fh:
        return [r["epoch"] for r in csv.DictReader(fh)]


def test_cli_resume_with_set(tiny_dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")
    run = tmp_path / "run"
    sets = [x for s in TINY for x in ("--set", s)]
    base = ["train", str(tiny_dataset), "--out", str(run), "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, *sets])
    assert res.exit_code == 0, res.output
    assert _epochs(run) == ["1"]

    # a key that changes what was learned: refused, nothing in the run folder changes
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = CliRunner().invoke(app, [*base, "--resume", *sets, "--set", "train.lr=0.5"])
    assert res.exit_code == 1
    assert "train.lr" in res.output and "cannot change on --resume" in res.output
    assert "Traceback" not in res.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    # an allowed key takes effect: the finished run goes on for one more epoch
    res = CliRunner().invoke(
        app, [*base, "--resume", *sets, "--set", "train.epochs=2", "--set", "data.workers=0"]
    )
    assert res.exit_code == 0, res.output
    assert _epochs(run) == ["1", "2"]
    assert "epochs: 2" in (run / "config.yaml").read_text()
