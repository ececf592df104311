"""`ctsparse predict` on a folder holding several series, and on MR input with --allow-non-ct."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctsparse.cli.main import app
from ctsparse.io import write_dicom_series
from ctsparse.volume import Volume
from tests.io_helpers import PYDICOM_DATA, ramp_volume

pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")

UIDS = [f"1.2.826.0.1.3680043.10.543.2{k}" for k in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ctsparse.config import load_config
    from ctsparse.training.loop import train

    cfg = load_config(
        None,
        ["model.widths=[8, 16]", "model.depths=[1, 1]", "preprocess.features=patch", "train.epochs=1"],
    )
    out = tmp_path_factory.mktemp("run")
    train(tiny_dataset, out, cfg, device="cpu")
    return out / "best.pt"


def _ct(shape: tuple[int, int, int], seed: int) -> Volume:
    return ramp_volume(shape, seed=seed)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    """Two CT series and an MR series of one study, side by side in one folder."""
    folder = tmp_path / "export"
    folder.mkdir()
    specs = [
        (UIDS[0], _ct((12, 12, 10), 1), {"SeriesDescription": "Chest 3.0"}),
        (UIDS[1], _ct((12, 12, 7), 2), {"SeriesDescription": "Chest MIP"}),
        (UIDS[2], _ct((12, 12, 4), 3), {"modality": "MR", "SeriesDescription": "T2"}),
    ]
    for k, (uid, vol, kw) in enumerate(specs):
        for p in write_dicom_series(vol, tmp_path / f"s{k}", series_uid=uid, **kw):  # type: ignore[arg-type]
            shutil.move(p, folder / f"s{k}_{p.name}")
    return folder


def test_one_row_per_ct_series_each_named(checkpoint: Path, export: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.json"
    res = CliRunner().invoke(
        app, ["predict", str(checkpoint), str(export), "--device", "cpu", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["series_uid"], r["series_description"], r["n_slices"]) for r in rows] == [
        (UIDS[0], "Chest 3.0", 10),
        (UIDS[1], "Chest MIP", 7),
    ]
    assert all(not r["error"] and r["label"] for r in rows)
    assert rows[0]["sites"] != rows[1]["sites"]  # two different series were read
    assert [(s["series_uid"], s["reason"]) for s in data["skipped"]] == [(UIDS[2], "modality MR is not CT")]
    assert "Chest 3.0, 10 slices" in res.output and UIDS[1] in res.output
    assert "skipped" in res.output and "pass --allow-non-ct to read it" in res.output
    assert "Anonymous" not in res.output and "Anonymous" not in out.read_text()

    csv_out = tmp_path / "pred.csv"
    res = CliRunner().invoke(
        app,
        ["predict", str(checkpoint), str(export), "--device", "cpu", "--series", UIDS[1], "-o", str(csv_out)],
    )
    assert res.exit_code == 0, res.output
    lines = csv_out.read_text().splitlines()
    assert len(lines) == 2 and UIDS[1] in lines[1] and "series_description" in lines[0]


def test_mr_refused_with_the_flag_predict_has(checkpoint: Path) -> None:
    from ctsparse.predict import predict

    mr = PYDICOM_DATA / "MR_small.dcm"
    res = CliRunner().invoke(app, ["predict", str(checkpoint), str(mr), "--device", "cpu"])
    assert res.exit_code == 1
    assert "not CT" in res.output and "--allow-non-ct" in res.output and "allow_non_ct" not in res.output
    res = CliRunner().invoke(app, ["predict", str(checkpoint), str(mr), "--device", "cpu", "--allow-non-ct"])
    assert res.exit_code == 0, res.output
    # the library: a neutral message by default, a prediction with allow_non_ct
    (row,) = predict(checkpoint, [mr], device="cpu")
    assert row["error"] == "modality MR is not CT"
    (row,) = predict(checkpoint, [mr], device="cpu", allow_non_ct=True)
    assert not row["error"] and row["modality"] == "MR" and row["label"]
