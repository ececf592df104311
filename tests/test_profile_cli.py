"""`ctsparse profile` on tiny real NIfTI files, called in-process."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ctsparse.cli.profile import profile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer(add_completion=False)
    a.command()(profile)
    return a


def _phantom(shape=(24, 20, 16), body_hu=40):
    arr = np.full(shape, -1000, dtype=np.int16)
    arr[4:20, 3:14, 2:14] = body_hu  # body: 16*11*12 = 2112 voxels
    arr[4:20, 16:18, :] = 300  # table: dropped by the body mask
    return arr


def _write(path, arr, spacing=(0.8, 0.8, 2.5)):
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.fixture
def scans(tmp_path):
    a = _write(tmp_path / "a.nii.gz", _phantom())
    b = _write(tmp_path / "b.nii", _phantom(shape=(20, 20, 10)))
    return a, b


def test_table_json_csv(app, scans, tmp_path):
    out_json, out_csv = tmp_path / "out" / "p.json", tmp_path / "out" / "p.csv"
    res = CliRunner().invoke(app, [*map(str, scans), "--json", str(out_json), "--csv", str(out_csv)])
    assert res.exit_code == 0, res.output
    assert "a.nii.gz" in res.output and "b.nii" in res.output
    assert "2 ok" in res.output and "0 failed" in res.output
    data = json.loads(out_json.read_text())
    assert data["summary"]["n_ok"] == 2 and data["summary"]["n_failed"] == 0
    row = data["scans"][0]
    assert row["dims"] == [24, 20, 16]
    assert row["spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert row["sites"] == 2112 and row["kept_voxels"] == 2112
    assert row["dropped_body_mask"] == 16 * 2 * 16
    assert row["occupancy"] == pytest.approx(2112 / (24 * 20 * 16))
    assert row["sweep"]["-500"] == pytest.approx((2112 + 512) / (24 * 20 * 16))
    assert row["sweep"]["500"] == 0
    assert row["dense_bytes"] == 24 * 20 * 16 * 4
    assert row["sparse_bytes"] == 2112 * (3 * 4 + 4)
    assert row["act_dense_bytes"] == 16 * 11 * 12 * 16 * 4
    assert row["hu"]["min"] == -1000 and row["hu"]["max"] == 300
    assert set(row["times"]) >= {"read", "resample", "threshold", "mask", "encode"}
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert rows[0]["dims"] == "24x20x16" and int(rows[0]["sites"]) == 2112
    assert "sweep.-500" in rows[0] and "hu.p50" in rows[0]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_threshold_shortcut_and_set_override(app, scans, tmp_path):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(
        app, [str(scans[0]), "--threshold", "100", "--set", "preprocess.body_mask=false", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["scans"][0]
    assert row["threshold"] == 100 and row["sites"] == 16 * 2 * 16  # only the table is >= 100 HU
    res = CliRunner().invoke(app, [str(scans[0]), "--set", "preprocess.nope=1"])
    assert res.exit_code == 1 and "preprocess.nope" in res.output and "Traceback" not in res.output


def test_plots_are_valid_pngs(app, scans, tmp_path):
    folder = tmp_path / "plots"
    res = CliRunner().invoke(app, [str(scans[0]), "--plots", str(folder)])
    assert res.exit_code == 0, res.output
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == ["000_a_hist.png", "000_a_slices.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 2000


def test_bad_input_among_good_ones(app, scans, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    air = _write(tmp_path / "air.nii.gz", np.full((8, 8, 8), -1000, dtype=np.int16))
    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, [str(scans[0]), str(bad), str(air), str(scans[1]), "--json", str(out)])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert "broken.nii.gz" in res.output and "no voxels survive" in res.output
    data = json.loads(out.read_text())
    assert [("error" in r) for r in data["scans"]] == [False, True, True, False]
    assert data["summary"]["n_ok"] == 2 and data["summary"]["n_failed"] == 2


def test_missing_path_is_one_line(app, tmp_path):
    res = CliRunner().invoke(app, [str(tmp_path / "nope.nii.gz")])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert "nope.nii.gz" in res.output and "no such file" in res.output


def test_dataset_folder_expands(app, scans, tmp_path):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(app, [str(tmp_path), "--json", str(out)])
    assert res.exit_code == 0, res.output
    paths = sorted(r["path"] for r in json.loads(out.read_text())["scans"])
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["a.nii.gz", "b.nii"]
