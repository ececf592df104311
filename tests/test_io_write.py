"""Writers (headers and storage choices) and dataset discovery, on real files."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from ctsparse.io import find_scans, is_scan_path, read_volume, write_dicom_series, write_nifti
from ctsparse.volume import Volume
from tests.io_helpers import PYDICOM_DATA, ramp_volume

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id", "birth_date")


def test_dicom_headers_look_like_a_scanner_series(tmp_path: Path) -> None:
    vol = ramp_volume((12, 10, 4))
    paths = write_dicom_series(vol, tmp_path, study_uid="1.2.9", series_uid="1.2.9.1")
    assert len(paths) == 4 and sorted(tmp_path.iterdir()) == sorted(paths)
    headers = [pydicom.dcmread(p) for p in paths]
    first = headers[0]
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert (
        first.Modality == "CT" and first.SeriesInstanceUID == "1.2.9.1" and first.StudyInstanceUID == "1.2.9"
    )
    assert str(first.PatientName) == "Anonymous" and first.PatientBirthDate == ""
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]  # standard axial LPS
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([0.9, 0.7])  # [row, column] spacing
    assert (first.Rows, first.Columns) == (10, 12)
    assert first.PixelRepresentation == 0 and float(first.RescaleIntercept) == -1024.0
    # returned in slice order: z increases by the slice spacing
    zs = [float(h.ImagePositionPatient[2]) for h in headers]
    assert np.diff(zs) == pytest.approx([2.5] * 3)
    # voxel (0, 0, 0) of the RAS volume is the last column and last row of the first image
    assert int(first.pixel_array[-1, -1]) - 1024 == vol.array[0, 0, 0]


def test_signed_storage_and_errors(tmp_path: Path) -> None:
    vol = ramp_volume((6, 6, 2))
    low = Volume(vol.array - 2000.0, vol.affine, "x")
    path = write_dicom_series(low, tmp_path / "a")[0]
    assert pydicom.dcmread(path).PixelRepresentation == 1
    np.testing.assert_array_equal(read_volume(tmp_path / "a").array, low.array)
    with pytest.raises(ValueError, match="16 bits"):
        write_dicom_series(Volume(vol.array * 100, vol.affine, "x"), tmp_path / "b")
    with pytest.raises(ValueError, match="keyword"):
        write_dicom_series(vol, tmp_path / "c", NotAKeyword=1)


def test_shuffled_names_and_instance_numbers(tmp_path: Path) -> None:
    paths = write_dicom_series(ramp_volume((4, 4, 6)), tmp_path, shuffle_names_seed=5)
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in paths]
    assert sorted(numbers) == list(range(1, 7)) and numbers != list(range(1, 7))


def test_overrides_and_slope(tmp_path: Path) -> None:
    vol = ramp_volume((6, 6, 3))
    paths = write_dicom_series(vol, tmp_path, slope=0.5, intercept=-1000.0, Manufacturer="ACME", KVP="120")
    ds = pydicom.dcmread(paths[0])
    assert ds.Manufacturer == "ACME" and float(ds.RescaleSlope) == 0.5
    out = read_volume(tmp_path)
    np.testing.assert_array_equal(out.array, vol.array)
    assert out.meta["vendor"] == "ACME" and out.meta["kvp"] == "120"
    assert not any(key in out.meta for key in IDENTIFYING)


def test_nifti_storage_type(tmp_path: Path) -> None:
    vol = ramp_volume((5, 5, 5))
    as_int = nib.load(str(write_nifti(vol, tmp_path / "i.nii.gz")))
    assert as_int.get_data_dtype() == np.int16 and int(as_int.header["sform_code"]) == 1
    frac = Volume(vol.array + np.float32(0.5), vol.affine, "x")
    assert nib.load(str(write_nifti(frac, tmp_path / "f.nii"))).get_data_dtype() == np.float32


def test_find_scans_tree(tmp_path: Path) -> None:
    vol = ramp_volume((4, 4, 2))
    root = tmp_path / "data"
    write_nifti(vol, root / "a.nii.gz")
    write_nifti(vol, root / "nested" / "b.nii")
    write_nifti(vol, root / ".hidden.nii.gz")
    write_dicom_series(vol, root / "patient1" / "series1")
    write_dicom_series(vol, root / "patient1" / "series2")
    write_dicom_series(vol, root / "flat")
    write_dicom_series(vol, root / ".trash" / "s")
    (root / "flat" / "notes.txt").write_text("n\n")
    (root / "labels.csv").write_text("scan,label\n")
    (root / "README.md").write_text("# data\n")
    (root / "empty").mkdir()
    (root / "docs").mkdir()
    (root / "docs" / "x.json").write_text("{}")
    shutil.copy(PYDICOM_DATA / "dicomdirtests" / "DICOMDIR", root / "DICOMDIR")

    expected = [
        root / "a.nii.gz",
        root / "flat",
        root / "nested" / "b.nii",
        root / "patient1" / "series1",
        root / "patient1" / "series2",
    ]
    assert find_scans(root) == expected
    assert find_scans(root / "a.nii.gz") == [root / "a.nii.gz"]
    assert find_scans(root / "empty") == []


def test_is_scan_path(tmp_path: Path) -> None:
    vol = ramp_volume((4, 4, 2))
    paths = write_dicom_series(vol, tmp_path / "study" / "s1")
    (tmp_path / "labels.csv").write_text("scan,label\n")
    assert is_scan_path(tmp_path / "study" / "s1") and is_scan_path(paths[0])
    assert is_scan_path(write_nifti(vol, tmp_path / "v.nii.gz"))
    assert not is_scan_path(tmp_path / "study")  # a folder of series is a dataset, not one scan
    assert not is_scan_path(tmp_path / "labels.csv")
    assert not is_scan_path(tmp_path / "missing.nii")
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"):  # files without preamble
        assert is_scan_path(PYDICOM_DATA / name)
