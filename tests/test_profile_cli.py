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
    hu = ["--set", "preprocess.features=hu"]  # one site per kept voxel, whatever the default
    res = CliRunner().invoke(app, [*map(str, scans), *hu, "--json", str(out_json), "--csv", str(out_csv)])
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
    assert row["volume_bytes"] == 24 * 20 * 16 * 4
    mem = row["memory"]  # the body fills its cropped grid: every cell is a site
    assert (mem["sites"], mem["grid_cells"], mem["channels"], mem["width"]) == (2112, 16 * 11 * 12, 1, 16)
    assert mem["input"]["coords_bytes"] == 2112 * 16 and mem["input"]["feats_bytes"] == 2112 * 4
    assert mem["input"]["dense_bytes"] == 16 * 11 * 12 * 4
    assert mem["first_layer"] == {"sparse_bytes": 2112 * 16 * 4, "dense_bytes": 16 * 11 * 12 * 16 * 4}
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
    sets = ["--set", "preprocess.body_mask=false", "--set", "preprocess.features=hu"]
    res = CliRunner().invoke(app, [str(scans[0]), "--threshold", "100", *sets, "--json", str(out)])
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


def test_memory_breakdown_adds_up(app, tmp_path):
    """Patch features on a scan that fills a fifth of its grid: each figure is its formula, the
    parts add up to the totals, and the first layer is where sparsity saves."""
    arr = np.full((24, 20, 16), -1000, dtype=np.int16)
    arr[4:20, 4:16, 2:14] = 40  # the body box, 16 x 12 x 12
    arr[6:18, 6:14, 4:12] = -900  # hollow: 2-voxel walls, air inside (like lungs)
    path = _write(tmp_path / "shell.nii.gz", arr)
    out = tmp_path / "p.json"
    sets = ["--set", "preprocess.features=patch", "--set", "preprocess.patch_size=2"]
    res = CliRunner().invoke(
        app,
        [
            str(path),
            *sets,
            "--set",
            "model.widths=[24, 48]",
            "--set",
            "model.depths=[1, 1]",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    m = data["scans"][0]["memory"]
    n, cells, c, w = m["sites"], m["grid_cells"], m["channels"], m["width"]
    assert (c, w, cells) == (8, 24, 8 * 6 * 6)  # 2^3 voxels per site; the grid of 2^3 blocks
    assert n == data["scans"][0]["sites"] and n < cells  # the air inside has no sites
    inp, act = m["input"], m["first_layer"]
    assert inp["coords_bytes"] == 16 * n and inp["feats_bytes"] == 4 * c * n
    assert inp["sparse_bytes"] == inp["coords_bytes"] + inp["feats_bytes"]
    assert inp["dense_bytes"] == 4 * c * cells
    assert m["stored_bytes"] == (12 + 4 * c) * n  # what the cache file holds: no batch index
    assert act == {"sparse_bytes": 4 * w * n, "dense_bytes": 4 * w * cells}
    assert inp["break_even_occupancy"] == pytest.approx(32 / 48)
    total = data["summary"]["total"]
    assert total["input_coords_bytes"] + total["input_feats_bytes"] == total["input_sparse_bytes"]
    assert total["first_layer_dense_bytes"] == act["dense_bytes"]
    assert "coords: 16 B per site" in res.output and "1st layer" in res.output


def test_multi_series_folder_gives_one_row_per_ct_series(app, tmp_path):
    import shutil

    from ctsparse.io import write_dicom_series
    from tests.io_helpers import ramp_volume

    folder = tmp_path / "export"
    folder.mkdir()
    for name, uid, shape, kw in (
        ("a", "1.2.826.0.1.3680043.10.543.11", (10, 10, 9), {"SeriesDescription": "Head 5mm"}),
        ("b", "1.2.826.0.1.3680043.10.543.12", (10, 10, 6), {"SeriesDescription": "Head bone"}),
        ("m", "1.2.826.0.1.3680043.10.543.13", (10, 10, 4), {"modality": "MR"}),
    ):
        for p in write_dicom_series(
            ramp_volume(shape, seed=len(name)), tmp_path / name, series_uid=uid, **kw
        ):
            shutil.move(p, folder / f"{name}_{p.name}")
    out_json, out_csv = tmp_path / "p.json", tmp_path / "p.csv"
    res = CliRunner().invoke(app, [str(folder), "--json", str(out_json), "--csv", str(out_csv)])
    assert res.exit_code == 0, res.output
    assert "Head 5mm, 9 slices" in res.output and "Head bone, 6 slices" in res.output
    assert "skipped" in res.output and "modality MR is not CT (pass --allow-non-ct" in res.output
    data = json.loads(out_json.read_text())
    assert [(r["series_description"], r["n_slices"]) for r in data["scans"]] == [
        ("Head 5mm", 9),
        ("Head bone", 6),
    ]
    assert [r["dims"][2] for r in data["scans"]] == [9, 6]  # each row read its own series
    assert data["skipped"][0]["series_uid"].endswith(".13") and "not CT" in data["skipped"][0]["reason"]
    with open(out_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["series_uid"][-3:] for r in rows] == [".11", ".12"] and rows[0]["n_slices"] == "9"

    res = CliRunner().invoke(app, [str(folder), "--series", "1.2.826.0.1.3680043.10.543.13"])
    assert res.exit_code == 1 and "--allow-non-ct" in res.output
    res = CliRunner().invoke(
        app, [str(folder), "--series", "1.2.826.0.1.3680043.10.543.13", "--allow-non-ct"]
    )
    assert res.exit_code == 0, res.output
