"""ctsparse.inputs on real DICOM files: a flat export with several series side by side, pydicom's
own CT/MR files and its DICOMDIR tree, globs and missing paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ctsparse.inputs import InputItem, expand_inputs
from ctsparse.io import read_volume, write_dicom_series
from ctsparse.volume import Volume
from tests.io_helpers import PYDICOM_DATA, ramp_volume

DICOMDIR_TESTS = PYDICOM_DATA / "dicomdirtests"
AXIAL, THIN, MR, SCOUT, DOSE = (f"1.2.826.0.1.3680043.10.543.{k}" for k in range(1, 6))
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def _add(volume: Volume, export: Path, prefix: str, uid: str, **kw: object) -> list[Path]:
    paths = write_dicom_series(volume, export.parent / prefix, series_uid=uid, **kw)  # type: ignore[arg-type]
    moved = [export / f"{prefix}_{p.name}" for p in paths]
    for p, dest in zip(paths, moved, strict=True):
        shutil.move(p, dest)
    return moved


@pytest.fixture
def export(tmp_path: Path) -> dict[str, object]:
    """A flat PACS export: two CT series, an MR series, a scout and a dose-report screenshot."""
    folder = tmp_path / "export"
    folder.mkdir()
    axial, thin = ramp_volume((8, 8, 9), seed=1), ramp_volume((8, 8, 5), seed=2)
    _add(axial, folder, "ax", AXIAL, SeriesDescription="Chest 3.0 B31f", SeriesNumber=3)
    _add(thin, folder, "thin", THIN, SeriesDescription="Chest 1.0 B70f", SeriesNumber=4)
    _add(ramp_volume((8, 8, 12), seed=3), folder, "mr", MR, modality="MR", SeriesDescription="T1")
    _add(ramp_volume((8, 8, 2)), folder, "scout", SCOUT, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    _add(ramp_volume((8, 8, 1)), folder, "dose", DOSE, SOPClassUID=SECONDARY_CAPTURE)
    (folder / "README.txt").write_text("exported\n")
    return {"folder": folder, "axial": axial, "thin": thin}


def test_flat_export_gives_one_item_per_ct_series(export: dict) -> None:
    found = expand_inputs([export["folder"]])
    assert [(i.series_uid, i.error) for i in found.items] == [(AXIAL, None), (THIN, None)]
    named = [i.describe() for i in found.items]
    assert named[0] == {
        "series_uid": AXIAL,
        "series_description": "Chest 3.0 B31f",
        "series_number": 3,
        "modality": "CT",
        "n_slices": 9,
    }
    assert named[1]["n_slices"] == 5 and named[1]["series_description"] == "Chest 1.0 B70f"
    reasons = {s.series.uid: s.reason for s in found.skipped if s.series is not None}
    assert reasons[MR] == "modality MR is not CT"
    assert reasons[SCOUT].startswith("localizer") and reasons[DOSE].startswith("secondary capture")
    assert not any("README" in s.line() for s in found.skipped)
    assert not any("Anonymous" in s.line() or "ANON" in str(s.as_dict()) for s in found.skipped)


def test_each_item_reads_its_own_series_and_nothing_else(export: dict) -> None:
    found = expand_inputs([export["folder"]])
    # the other series' files go bad after listing: reading one series must not open them
    for p in export["folder"].iterdir():
        if not p.name.startswith("thin_"):
            p.write_bytes(b"\0" * 200)
    thin = read_volume(found.items[1].path, **found.items[1].read_kwargs())
    np.testing.assert_array_equal(thin.array, export["thin"].array)
    assert thin.meta["series_uid"] == THIN and thin.meta["skipped"] == []


def test_requested_series_and_one_per_folder(export: dict) -> None:
    one = expand_inputs([export["folder"]], series_uid=THIN)
    assert [i.series_uid for i in one.items] == [THIN]
    assert {s.series.uid for s in one.skipped if s.series} == {AXIAL, MR, SCOUT, DOSE}
    absent = expand_inputs([export["folder"]], series_uid="9.9.9")
    (err,) = [i.error for i in absent.items]
    assert str(err).startswith("series 9.9.9 not found; available: ") and AXIAL in str(err)
    largest = expand_inputs([export["folder"]], all_series=False)
    assert [i.series_uid for i in largest.items] == [AXIAL]
    assert any(s.reason.startswith("smaller series") and s.series.uid == THIN for s in largest.skipped)
    # the choice is the reader's own default, so train (one scan per folder) reads the same series
    assert read_volume(export["folder"]).meta["series_uid"] == AXIAL


def test_non_ct_input_is_an_error_unless_allowed() -> None:
    mr = PYDICOM_DATA / "MR_small.dcm"
    (item,) = expand_inputs([mr]).items
    assert item.error == "modality MR is not CT" and item.series is not None
    assert "--allow-non-ct" not in item.error  # the library does not know the caller's options
    (item,) = expand_inputs([mr], allow_non_ct=True).items
    assert item.error is None and item.describe()["modality"] == "MR"
    assert read_volume(item.path, allow_non_ct=True, **item.read_kwargs()).meta["modality"] == "MR"


def test_pydicom_ct_small_and_dicomdir_tree() -> None:
    (ct,) = expand_inputs([PYDICOM_DATA / "CT_small.dcm"]).items
    assert ct.error is None and ct.describe()["n_slices"] == 1 and ct.describe()["modality"] == "CT"
    tree = expand_inputs([DICOMDIR_TESTS])
    rel = {(i.path.relative_to(DICOMDIR_TESTS).as_posix(), i.describe()["n_slices"]) for i in tree.items}
    assert ("98892001/CT5N", 5) in rel and all(i.error is None for i in tree.items)
    # MR series and scouts found inside a dataset tree are listed, not failed
    skipped = [(s.path.relative_to(DICOMDIR_TESTS).as_posix(), s.reason) for s in tree.skipped]
    assert any(p.startswith("98892003") and "MR" in r for p, r in skipped)
    assert any(p == "98892001/CT2N" for p, _ in skipped)


def test_globs_missing_paths_and_items_passed_through(tmp_path: Path, export: dict) -> None:
    found = expand_inputs(
        [str(tmp_path / "exp*"), tmp_path / "nope.nii.gz", str(tmp_path / "*.nii"), InputItem(Path("x"))]
    )
    assert [i.series_uid for i in found.items[:2]] == [AXIAL, THIN]
    assert found.items[2].error == "no such file or folder"
    assert found.items[3].error == "no file matches this pattern"
    assert found.items[4] == InputItem(Path("x"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no NIfTI, MetaImage or DICOM scan" in str(expand_inputs([empty]).items[0].error)


def test_series_info_carries_no_patient_identifiers(export: dict) -> None:
    header = pydicom.dcmread(next(export["folder"].glob("ax_*")), stop_before_pixels=True)
    assert header.PatientName == "Anonymous"
    values = [str(v) for i in expand_inputs([export["folder"]]).items for v in i.describe().values()]
    assert not any(str(header.PatientName) in v or str(header.PatientID) in v for v in values)
