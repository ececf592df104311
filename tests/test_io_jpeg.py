"""JPEG baseline and JPEG lossless CT series decode through the pylibjpeg plugins to the right HU
and geometry (JPEG-LS, JPEG 2000 and RLE: tests/test_io_dicom.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLosslessSV1

from ctsparse.io import read_volume, write_dicom_series
from tests.io_helpers import encode_jpeg_lossless, ramp_volume, recompress_series


def test_jpeg_lossless_series_reads_back_exactly(tmp_path: Path) -> None:
    vol = ramp_volume((20, 17, 4))
    plain = read_volume(write_dicom_series(vol, tmp_path / "plain")[0].parent)
    write_dicom_series(vol, tmp_path / "jpeg")
    recompress_series(
        tmp_path / "jpeg",
        JPEGLosslessSV1,
        lambda stored: encode_jpeg_lossless(stored.astype(np.uint16)),
        BitsAllocated=16,
        BitsStored=16,
        HighBit=15,
        PixelRepresentation=0,
        RescaleSlope=1,
        RescaleIntercept=-1024,
    )
    first = pydicom.dcmread(next((tmp_path / "jpeg").iterdir()))
    assert first.file_meta.TransferSyntaxUID == JPEGLosslessSV1 and first["PixelData"].is_undefined_length
    out = read_volume(tmp_path / "jpeg")
    assert out.meta["transfer_syntax"] == JPEGLosslessSV1
    np.testing.assert_array_equal(out.array, vol.array)  # lossless: every HU back
    np.testing.assert_array_equal(out.array, plain.array)
    np.testing.assert_allclose(out.affine, plain.affine, atol=1e-6)


def test_jpeg_baseline_8bit_series_reads_back_with_its_rescale(tmp_path: Path) -> None:
    """8-bit baseline (lossy) CT: stored = (HU + 1024) / 16. The volume is what a JPEG decoder
    makes of the stored bytes, rescaled, within one stored unit (decoders' IDCTs differ by 1)."""
    Image = pytest.importorskip("PIL.Image")

    def baseline(stored: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.clip(stored, 0, 255).astype(np.uint8), mode="L").save(buf, "JPEG", quality=95)
        return buf.getvalue()

    vol = ramp_volume((24, 20, 3))
    write_dicom_series(vol, tmp_path / "jpeg")
    recompress_series(
        tmp_path / "jpeg",
        JPEGBaseline8Bit,
        baseline,
        BitsAllocated=8,
        BitsStored=8,
        HighBit=7,
        PixelRepresentation=0,
        RescaleSlope=16,
        RescaleIntercept=-1024,
    )
    out = read_volume(tmp_path / "jpeg")
    assert out.meta["transfer_syntax"] == JPEGBaseline8Bit
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-6)
    # the reference: the same files with the pixels Pillow decodes stored uncompressed
    (tmp_path / "plain").mkdir()
    for path in sorted((tmp_path / "jpeg").iterdir()):
        ds = pydicom.dcmread(path)
        (fragment,) = generate_frames(ds.PixelData, number_of_frames=1)
        ds.PixelData = np.asarray(Image.open(io.BytesIO(fragment)), dtype=np.uint8).tobytes()
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", False
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(tmp_path / "plain" / path.name, enforce_file_format=True)
    expected = read_volume(tmp_path / "plain").array
    assert np.abs(out.array - expected).max() <= 16
    assert np.abs(out.array - vol.array).mean() < 16  # and near the original scan
