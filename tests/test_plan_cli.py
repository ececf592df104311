"""`ctsparse plan` and `ctsparse train` without --config: tables with reasons, plan files, --set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ctsparse.cli.main import app
from ctsparse.config import load_config
from tests.plan_helpers import write_dataset

TINY_MODEL = ["--set", "model.widths=[8, 16]", "--set", "model.depths=[1, 1]"]


def test_plan_prints_reasons_and_writes_a_config(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    data = write_dataset(tmp_path / "data", "uint8")
    out, js = tmp_path / "plan.yaml", tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", str(data), "--no-measure", "--out", str(out), "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert "reason" in res.output and "preprocess.threshold" in res.output
    assert "values are not HU" in res.output and "instead of the HU body threshold" in res.output
    cfg = load_config(out)
    record = json.loads(js.read_text())
    planned = record["plan"]["values"]
    assert cfg.preprocess.threshold == planned["preprocess.threshold"]["value"]
    assert cfg.preprocess.body_mask is False
    assert record["fingerprint"]["kind"] == "uint8" and record["measurements"] is None
    assert record["fingerprint"]["summary"]["scans"]["read"] == 6


def test_plan_of_a_missing_dataset_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "does not exist" in res.output


@pytest.mark.slow
def test_train_without_config_plans_and_set_wins(tiny_dataset: Path, tmp_path: Path) -> None:
    pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed")
    out = tmp_path / "run"
    args = ["train", str(tiny_dataset), "--out", str(out), "--device", "cpu", "--no-measure"]
    res = CliRunner().invoke(app, [*args, *TINY_MODEL, "--set", "train.epochs=1"])
    assert res.exit_code == 0, res.output
    assert "preprocess.region" in res.output and "reason" in res.output
    record = json.loads((out / "plan.json").read_text())
    assert (out / "config.yaml").is_file()
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["train"]["epochs"] == 1  # --set beats the plan
    assert record["plan"]["values"]["train.epochs"]["value"] >= 10
    assert record["overridden"]["train.epochs"] == {
        "planned": record["plan"]["values"]["train.epochs"]["value"],
        "used": 1,
    }
    for key, p in record["plan"]["values"].items():  # every other planned key is what trained
        section, name = key.split(".")
        if key not in record["overridden"]:
            assert used[section][name] == p["value"], key
    again = CliRunner().invoke(app, [*args, "--config", str(out / "config.yaml"), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert "no planning" in again.output and not (out / "plan.json").exists()


def test_measure_device_times_both_kernels_on_a_real_scan(tiny_dataset: Path) -> None:
    pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed")
    from ctsparse.config import ModelConfig, PreprocessConfig
    from ctsparse.plan import measure_device

    scan = sorted(tiny_dataset.glob("*.nii.gz"))[0]
    small = ModelConfig(widths=[8, 16], depths=[1, 1])
    cands = [("cube", 1), ("cross", 1), ("cube", 2)]
    meas = measure_device(scan, PreprocessConfig(features="hu"), cands, "cpu", model=small, repeats=1)
    assert not meas.errors, meas.errors
    assert [(s.kernel, s.patch_size) for s in meas.steps] == cands  # in the order given
    one, two = meas.step("cube", 1), meas.step("cube", 2)
    assert one is not None and two is not None
    assert one.channels == 1 and two.channels == 8 and two.sites < one.sites
    assert all(s.step_s > 0 and len(s.step_all_s) == 1 for s in meas.steps)
    assert meas.memory_method.startswith("RSS")


@pytest.mark.slow
def test_plan_measures_on_this_device(tiny_dataset: Path) -> None:
    pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed")
    from ctsparse.plan import plan_dataset

    planning = plan_dataset(tiny_dataset, device="cpu", max_scans=4)
    meas = planning.measurements
    assert meas is not None and not meas.errors, meas
    k = planning.plan.values["preprocess.patch_size"].value
    assert {("cube", k), ("cross", k)} <= {(s.kernel, s.patch_size) for s in meas.steps}
    assert planning.plan.measured
    assert "faster than cube" in planning.plan.values["model.kernel"].reason
    assert "measured on cpu" in planning.plan.values["train.epochs"].reason
