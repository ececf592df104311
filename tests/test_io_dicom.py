"""DICOM reader on real files: round trips through write_dicom_series, pydicom's own CT/MR test
data, and every vendor quirk the reader claims to handle."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from ctsparse.errors import ScanError
from ctsparse.io import find_scans, read_volume, write_dicom_series, write_nifti
from ctsparse.volume import Volume
from tests.io_helpers import PYDICOM_DATA, edit_dicom, ramp_volume, rotation_z, slice_z, write_enhanced_ct

DICOMDIR_TESTS = PYDICOM_DATA / "dicomdirtests"


def assert_same(a: Volume, b: Volume) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


@pytest.mark.parametrize("slice_axis", [2, 1, 0])
def test_round_trip_matches_nifti(tmp_path: Path, slice_axis: int) -> None:
    vol = ramp_volume()
    write_nifti(vol, tmp_path / "v.nii.gz")
    paths = write_dicom_series(vol, tmp_path / "dcm", shuffle_names_seed=7, slice_axis=slice_axis)
    assert [p.name for p in paths] != sorted(p.name for p in paths)  # names do not follow position
    from_dicom, from_nifti = read_volume(tmp_path / "dcm"), read_volume(tmp_path / "v.nii.gz")
    assert_same(from_dicom, vol)
    assert_same(from_nifti, vol)
    assert from_dicom.spacing == pytest.approx((0.7, 0.9, 2.5), abs=1e-5)
    assert from_dicom.meta["warnings"] == [] and from_dicom.meta["n_files"] == vol.shape[slice_axis]


def test_round_trip_oblique(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[:3, :3] = rotation_z(12.0) @ np.diag([0.8, 0.6, 3.0])
    affine[:3, 3] = [5.0, -7.0, 40.0]
    vol = ramp_volume((10, 9, 6), affine)
    write_dicom_series(vol, tmp_path / "dcm", shuffle_names_seed=1)
    assert_same(read_volume(tmp_path / "dcm"), vol)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_round_trip_other_transfer_syntaxes(tmp_path: Path, syntax: str) -> None:
    vol = ramp_volume((32, 32, 3))  # openjpeg needs tiles of at least 2^5 pixels
    write_dicom_series(vol, tmp_path / "dcm", transfer_syntax=syntax)
    out = read_volume(tmp_path / "dcm")
    assert_same(out, vol)
    assert out.meta["transfer_syntax"] == syntax


def test_pydicom_ct_small_single_file() -> None:
    vol = read_volume(PYDICOM_DATA / "CT_small.dcm")
    assert vol.shape == (128, 128, 1)
    assert vol.spacing[:2] == pytest.approx((0.661468, 0.661468))
    assert vol.meta["modality"] == "CT" and vol.meta["format"] == "dicom"
    assert -1100 < vol.array.min() < -800 and 1000 < vol.array.max() < 1300
    assert "PatientName" not in vol.meta and "patient_name" not in vol.meta


def test_pydicom_j2k_ct_512() -> None:
    vol = read_volume(PYDICOM_DATA / "693_J2KI.dcm")
    assert vol.shape == (512, 512, 1)
    assert vol.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.91"
    # lossy J2K smears the padding value (-2000 stored) over a range; all of it must become air
    assert vol.array.min() == -1024.0 and vol.array.max() > 1000


def test_pydicom_study_folder_skips_localizer_series() -> None:
    # 98892001 holds a localizer series (CT2N, 2 scouts) and a 5-slice axial series (CT5N).
    vol = read_volume(DICOMDIR_TESTS / "98892001")
    assert vol.shape == (16, 16, 5)
    assert vol.spacing == pytest.approx((0.488281, 0.488281, 2.5), abs=1e-5)
    assert any("localizer (scout) images only" in s for s in vol.meta["skipped"])
    # the axial files are stored superior first; the array must run inferior -> superior
    assert vol.affine[2, 2] > 0 and vol.affine[2, 3] == pytest.approx(-1.2375, abs=1e-4)


def test_pydicom_dicomdir_tree() -> None:
    # The root holds only DICOMDIR indexes; the images are in patient/series subfolders.
    vol = read_volume(DICOMDIR_TESTS)
    assert vol.shape == (16, 16, 5) and vol.meta["modality"] == "CT"
    scans = [p.relative_to(DICOMDIR_TESTS).as_posix() for p in find_scans(DICOMDIR_TESTS)]
    assert "98892001/CT5N" in scans and "77654033/CT2" in scans and "98892003/MR1" in scans
    assert "." not in scans and not any(s.startswith("TINY_ALPHA") for s in scans)  # no images there


def test_pydicom_series_with_stray_slice() -> None:
    # 77654033/CT2: three slices 1.25 mm apart and one lone slice 200 mm away.
    vol = read_volume(DICOMDIR_TESTS / "77654033" / "CT2")
    assert vol.shape == (16, 16, 3)
    assert vol.spacing[2] == pytest.approx(1.25, abs=1e-4)
    assert any("blocks" in w for w in vol.meta["warnings"])


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_compressed_mr_refused_unless_allowed(name: str) -> None:
    with pytest.raises(ScanError, match="not CT") as err:
        read_volume(PYDICOM_DATA / name)
    assert name in str(err.value)
    vol = read_volume(PYDICOM_DATA / name, allow_non_ct=True)
    reference = read_volume(PYDICOM_DATA / "MR_small.dcm", allow_non_ct=True)
    assert vol.meta["modality"] == "MR"
    assert_same(vol, reference)


def test_multi_series_folder(tmp_path: Path) -> None:
    big, small = ramp_volume((8, 8, 9), seed=1), ramp_volume((8, 8, 5), seed=2)
    write_dicom_series(big, tmp_path / "all", series_uid="1.2.3.1")
    small_paths = write_dicom_series(small, tmp_path / "s", series_uid="1.2.3.2")
    for p in small_paths:
        shutil.move(p, tmp_path / "all" / f"small_{p.name}")
    for p in write_dicom_series(ramp_volume((8, 8, 12)), tmp_path / "m", series_uid="1.2.3.3", modality="MR"):
        shutil.move(p, tmp_path / "all" / f"mr_{p.name}")
    (tmp_path / "all" / "README.txt").write_text("notes\n")

    vol = read_volume(tmp_path / "all")
    assert vol.meta["series_uid"] == "1.2.3.1"
    assert_same(vol, big)
    skipped = " | ".join(vol.meta["skipped"])
    assert "1.2.3.2" in skipped and "1.2.3.3" in skipped and "README.txt" in skipped

    assert_same(read_volume(tmp_path / "all", series_uid="1.2.3.2"), small)
    with pytest.raises(ScanError, match="not CT"):
        read_volume(tmp_path / "all", series_uid="1.2.3.3")
    with pytest.raises(ScanError, match="not found"):
        read_volume(tmp_path / "all", series_uid="9.9")


def test_study_folder_with_series_subfolders(tmp_path: Path) -> None:
    big = ramp_volume((8, 8, 7), seed=4)
    write_dicom_series(ramp_volume((8, 8, 3)), tmp_path / "study" / "s1")
    write_dicom_series(big, tmp_path / "study" / "s2", shuffle_names_seed=2)
    (tmp_path / "study" / "README.txt").write_text("two series\n")
    out = read_volume(tmp_path / "study")
    assert_same(out, big)
    assert any("smaller" in s for s in out.meta["skipped"])


def test_localizer_and_orthogonal_slice_skipped(tmp_path: Path) -> None:
    vol = ramp_volume((8, 8, 6))
    paths = write_dicom_series(vol, tmp_path)
    uid = pydicom.dcmread(paths[0]).SeriesInstanceUID
    scout = ramp_volume((8, 6, 8))
    for name, image_type in (
        ("scout", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
        ("sag", ["ORIGINAL", "PRIMARY"]),
    ):
        extra = write_dicom_series(
            scout, tmp_path / name, slice_axis=0, series_uid=uid, ImageType=image_type
        )[0]
        shutil.move(extra, tmp_path / f"{name}.dcm")
        shutil.rmtree(tmp_path / name)
    out = read_volume(tmp_path)
    assert_same(out, vol)
    skipped = " | ".join(out.meta["skipped"])
    assert "localizer/scout image(s): scout.dcm" in skipped and "sag.dcm" in skipped


def test_missing_slice_interpolated_with_warning(tmp_path: Path) -> None:
    vol = ramp_volume((8, 8, 10))
    paths = write_dicom_series(vol, tmp_path)
    paths[4].unlink()
    out = read_volume(tmp_path)
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-4)
    assert any("uneven slice spacing" in w and "1 slice(s) interpolated" in w for w in out.meta["warnings"])
    keep = [k for k in range(10) if k != 4]
    np.testing.assert_array_equal(out.array[:, :, keep], vol.array[:, :, keep])
    np.testing.assert_allclose(out.array[:, :, 4], (vol.array[:, :, 3] + vol.array[:, :, 5]) / 2)


def test_gantry_tilt_keeps_sheared_affine(tmp_path: Path) -> None:
    affine = np.diag([0.7, 0.9, 2.5, 1.0])
    affine[1, 2] = 2.5 * np.tan(np.radians(15))  # each slice shifts along y: a 15 degree tilt
    vol = ramp_volume((8, 8, 6), affine)
    write_dicom_series(vol, tmp_path, shuffle_names_seed=0, GantryDetectorTilt="15")
    out = read_volume(tmp_path)
    assert_same(out, vol)
    assert any("gantry tilt" in w and "15.00" in w for w in out.meta["warnings"])


def test_mixed_sizes_minority_dropped_and_tie_refused(tmp_path: Path) -> None:
    vol = ramp_volume((8, 8, 6))
    uid = "1.2.3.4"
    write_dicom_series(vol, tmp_path / "a", series_uid=uid)
    for p in write_dicom_series(ramp_volume((6, 6, 2)), tmp_path / "b", series_uid=uid):
        shutil.move(p, tmp_path / "a" / f"small_{p.name}")
    out = read_volume(tmp_path / "a")
    assert_same(out, vol)
    assert any("2 slice(s)" in w for w in out.meta["warnings"])

    write_dicom_series(ramp_volume((8, 8, 3)), tmp_path / "c", series_uid=uid)
    for p in write_dicom_series(ramp_volume((6, 6, 3)), tmp_path / "d", series_uid=uid):
        shutil.move(p, tmp_path / "c" / f"small_{p.name}")
    with pytest.raises(ScanError, match="cannot tell"):
        read_volume(tmp_path / "c")


def test_duplicate_slice_kept_once(tmp_path: Path) -> None:
    vol = ramp_volume((8, 8, 5))
    paths = write_dicom_series(vol, tmp_path)

    def new_instance(ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = 99

    edit_dicom(paths[2], new_instance, tmp_path / "copy.dcm")
    out = read_volume(tmp_path)
    assert_same(out, vol)
    assert any("repeat a position" in w and "copy.dcm" in w for w in out.meta["warnings"])


def test_pixel_padding_becomes_air(tmp_path: Path) -> None:
    vol = ramp_volume((8, 8, 3))
    arr = vol.array.copy()
    arr[0, :, :] = -3024.0  # outside the reconstruction circle; stored -2000 with intercept -1024
    write_dicom_series(Volume(arr, vol.affine, "x"), tmp_path, PixelPaddingValue=-2000)
    out = read_volume(tmp_path)
    assert np.all(out.array[0] == -1024.0)
    np.testing.assert_array_equal(out.array[1:], vol.array[1:])


def test_per_slice_rescale(tmp_path: Path) -> None:
    vol = ramp_volume((8, 8, 4))
    paths = write_dicom_series(vol, tmp_path)

    def rescale(ds: pydicom.Dataset) -> None:
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1000"
        ds.PixelData = np.round((hu + 1000) / 0.5).astype(np.uint16).tobytes()

    edit_dicom(paths[1], rescale)
    assert float(pydicom.dcmread(paths[1]).RescaleIntercept) == -1000
    assert_same(read_volume(tmp_path), vol)


def test_enhanced_multiframe_ct(tmp_path: Path) -> None:
    vol = ramp_volume((10, 8, 6))
    path = write_enhanced_ct(vol, tmp_path / "enhanced.dcm", seed=3)
    out = read_volume(path)
    assert_same(out, vol)
    assert out.meta["enhanced"] is True and out.meta["n_slices"] == 6 and out.meta["n_files"] == 1
    assert_same(read_volume(tmp_path), vol)  # the folder holding it reads the same


def test_single_file_of_a_series(tmp_path: Path) -> None:
    paths = write_dicom_series(ramp_volume((8, 8, 4)), tmp_path)
    out = read_volume(paths[0])
    assert out.shape == (8, 8, 1)
    assert out.spacing[2] == pytest.approx(2.5)
    assert slice_z(paths[0]) == pytest.approx(out.affine[2, 3])


def test_bad_dicom_inputs(tmp_path: Path) -> None:
    paths = write_dicom_series(ramp_volume((16, 16, 2)), tmp_path / "ok")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(paths[0].read_bytes()[:-200])
    no_pixels = write_dicom_series(ramp_volume((8, 8, 1)), tmp_path / "nopix", PixelData=None)[0]
    mr = write_dicom_series(ramp_volume((8, 8, 1)), tmp_path / "mr", modality="MR")[0]
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("hello\n")
    (text_dir / "labels.csv").write_text("scan,label\n")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "no such file",
        tmp_path / "empty": "empty folder",
        text_dir: "no DICOM image",
        text_dir / "a.txt": "not a DICOM file",
        truncated: "pixel data",
        no_pixels: "no pixel data",
        mr: "modality MR is not CT",
        PYDICOM_DATA / "rtstruct.dcm": "not an image",
    }
    for path, reason in cases.items():
        with pytest.raises(ScanError, match=reason) as err:
            read_volume(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ScanError, match="pixel data"):
        read_volume(PYDICOM_DATA / "MR_truncated.dcm", allow_non_ct=True)


def test_undecodable_transfer_syntax_named(tmp_path: Path) -> None:
    path = write_dicom_series(ramp_volume((8, 8, 1)), tmp_path)[0]

    def to_mpeg(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.PixelData = encapsulate([b"\x00" * 64])

    edit_dicom(path, to_mpeg)
    with pytest.raises(ScanError, match="MPEG2") as err:
        read_volume(path)
    assert str(path) in str(err.value)
