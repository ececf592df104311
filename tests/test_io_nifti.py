"""NIfTI reader on real nibabel files: orientation, scaling, shapes, and every bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctsparse.errors import ScanError
from ctsparse.io import read_volume, write_nifti
from ctsparse.volume import Volume
from tests.io_helpers import ramp_volume


def save(data: np.ndarray, affine: np.ndarray, path: Path, **header: float) -> Path:
    img = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    vol = ramp_volume()
    out = read_volume(write_nifti(vol, tmp_path / name))
    np.testing.assert_array_equal(out.array, vol.array)
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-6)
    assert out.array.dtype == np.float32 and out.meta["format"] == "nifti"
    assert out.spacing == pytest.approx((0.7, 0.9, 2.5))


def test_float_values_round_trip(tmp_path: Path) -> None:
    vol = ramp_volume()
    vol = Volume(vol.array + np.float32(0.25), vol.affine, "x")
    out = read_volume(write_nifti(vol, tmp_path / "f.nii.gz"))
    np.testing.assert_array_equal(out.array, vol.array)


def test_lps_stored_file_is_reoriented(tmp_path: Path) -> None:
    # Stored as an LPS axial acquisition with axes (x, y, z) -> array order (z, y, x) would be too
    # easy; use a permutation plus flips: array axis 0 runs toward P, axis 1 toward L, axis 2 toward I.
    vol = ramp_volume((6, 7, 5))
    stored = np.ascontiguousarray(vol.array.transpose(1, 0, 2)[::-1, ::-1, ::-1])
    affine = np.zeros((4, 4))
    affine[:3, 0] = [0, -0.9, 0]
    affine[:3, 1] = [-0.7, 0, 0]
    affine[:3, 2] = [0, 0, -2.5]
    affine[:3, 3] = vol.affine[:3, :3] @ [5, 6, 4] + vol.affine[:3, 3]
    affine[3, 3] = 1
    out = read_volume(save(stored, affine, tmp_path / "lps.nii.gz"))
    np.testing.assert_array_equal(out.array, vol.array)
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-5)
    canonical = nib.as_closest_canonical(nib.load(str(tmp_path / "lps.nii.gz")))
    np.testing.assert_allclose(out.affine, canonical.affine, atol=1e-6)


def test_qform_used_when_no_sform(tmp_path: Path) -> None:
    vol = ramp_volume((4, 4, 3))
    img = nib.Nifti1Image(vol.array, None)
    img.set_qform(vol.affine, code=1)
    img.set_sform(np.eye(4), code=0)
    nib.save(img, str(tmp_path / "q.nii"))
    out = read_volume(tmp_path / "q.nii")
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-5)
    assert out.meta["sform_code"] == 0 and out.meta["qform_code"] == 1


def test_scl_slope_inter_applied(tmp_path: Path) -> None:
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    path = save(stored, np.eye(4), tmp_path / "s.nii", scl_slope=2.0, scl_inter=-1024.0)
    out = read_volume(path)
    np.testing.assert_array_equal(out.array, stored * 2.0 - 1024.0)


def test_singleton_4d_accepted_and_true_4d_refused(tmp_path: Path) -> None:
    data = np.full((3, 4, 5, 1), -500, dtype=np.int16)
    assert read_volume(save(data, np.eye(4), tmp_path / "a.nii.gz")).shape == (3, 4, 5)
    with pytest.raises(ScanError, match="4D") as err:
        read_volume(save(np.zeros((3, 4, 5, 2), np.int16), np.eye(4), tmp_path / "b.nii.gz"))
    assert "b.nii.gz" in str(err.value)


def test_non_hu_values_warned(tmp_path: Path) -> None:
    out = read_volume(save(np.full((3, 3, 3), 100, np.uint16), np.eye(4), tmp_path / "u.nii"))
    assert any("HU" in w for w in out.meta["warnings"])


@pytest.mark.parametrize("name", ["t.nii", "t.nii.gz"])
def test_truncated_file(tmp_path: Path, name: str) -> None:
    path = write_nifti(ramp_volume((20, 20, 10)), tmp_path / name)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ScanError, match=r"truncated|corrupt") as err:
        read_volume(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_header_only_fragment(tmp_path: Path) -> None:
    path = write_nifti(ramp_volume(), tmp_path / "h.nii")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ScanError, match="NIfTI"):
        read_volume(path)


def test_not_gzip_and_not_nifti(tmp_path: Path) -> None:
    fake_gz = tmp_path / "fake.nii.gz"
    fake_gz.write_bytes(b"this is not gzip data at all" * 20)
    bad_magic = tmp_path / "bad.nii.gz"
    bad_magic.write_bytes(gzip.compress(b"\x00" * 400))
    for path in (fake_gz, bad_magic):
        with pytest.raises(ScanError) as err:
            read_volume(path)
        assert str(path) in str(err.value)


def test_nan_refused(tmp_path: Path) -> None:
    data = np.full((4, 4, 4), -1000.0, np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(ScanError, match="NaN") as err:
        read_volume(save(data, np.eye(4), tmp_path / "nan.nii.gz"))
    assert "nan.nii.gz" in str(err.value)
