"""A map on a scan's voxel grid -> a DICOM Parametric Map whose frames lie on the source images.

The map written is the scan's own HU, scaled to 0..1, so every Parametric Map frame must equal the
source image it was placed on: any flip, transpose or frame mix-up shows.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ParametricMapStorage, generate_uid

from ctsparse import __version__
from ctsparse.dicom_node.saliency import SALIENCY_SERIES_OFFSET, write_saliency_map
from ctsparse.errors import ScanError
from ctsparse.io import read_volume, write_dicom_series
from tests.io_helpers import edit_dicom, ramp_volume, write_enhanced_ct

MODEL = {
    "name": "ctsparse sparse classifier",
    "ctsparse_version": __version__,
    "checkpoint_sha256": "ab" * 32,
}


def _scaled(path: Path) -> tuple[np.ndarray, np.ndarray, float, float]:
    vol = read_volume(path)
    lo, hi = float(vol.array.min()), float(vol.array.max())
    return (vol.array - lo) / (hi - lo), vol.affine, lo, hi


def test_frames_lie_on_their_source_images(tmp_path: Path) -> None:
    """Coronal slices, file names and InstanceNumber shuffled, sex "U" that highdicom refuses."""
    files = write_dicom_series(
        ramp_volume((12, 10, 8), seed=1),
        tmp_path / "src",
        slice_axis=1,
        shuffle_names_seed=3,
        PatientSex="U",
        PatientID="PID-1",
        SeriesNumber=4,
    )
    values, affine, lo, hi = _scaled(tmp_path / "src")
    out = write_saliency_map(
        values, affine, files, tmp_path / "out", MODEL, method="gradcam", target="nodule"
    )
    ds = pydicom.dcmread(out)
    assert isinstance(hd.imread(out), hd.Image)
    sources = {str(s.SOPInstanceUID): s for s in (pydicom.dcmread(f) for f in files)}
    assert ds.SOPClassUID == ParametricMapStorage and int(ds.NumberOfFrames) == len(files)
    assert (
        ds.SOPInstanceUID not in sources
        and ds.SeriesInstanceUID != next(iter(sources.values())).SeriesInstanceUID
    )
    first = next(iter(sources.values()))
    assert (
        ds.StudyInstanceUID == first.StudyInstanceUID and ds.FrameOfReferenceUID == first.FrameOfReferenceUID
    )
    assert (ds.PatientSex, ds.PatientID, ds.SeriesNumber) == ("U", "PID-1", SALIENCY_SERIES_OFFSET + 4)
    assert "gradcam saliency of nodule" in ds.ContentDescription
    frames = ds.pixel_array
    placed = set()
    for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ref = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        src = sources[ref]
        hu = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
        np.testing.assert_allclose(frames[k], (hu - lo) / (hi - lo), atol=1e-5)
        placed.add(ref)
    assert placed == set(sources)


def test_enhanced_multiframe_source(tmp_path: Path) -> None:
    """One frame per source frame, matched by position (highdicom orders frames along the normal)."""
    path = write_enhanced_ct(ramp_volume((12, 10, 6), seed=2), tmp_path / "enhanced.dcm")
    edit_dicom(path, lambda d: setattr(d, "FrameOfReferenceUID", generate_uid()))
    values, affine, lo, hi = _scaled(path)
    ds = pydicom.dcmread(write_saliency_map(values, affine, [path], tmp_path / "out", MODEL))
    src = pydicom.dcmread(path)
    positions = [
        np.array(g.PlanePositionSequence[0].ImagePositionPatient, float)
        for g in src.PerFrameFunctionalGroupsSequence
    ]
    assert int(ds.NumberOfFrames) == len(positions)
    for k, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        j = int(np.argmin([np.abs(p - pos).sum() for p in positions]))
        rescale = src.PerFrameFunctionalGroupsSequence[j].PixelValueTransformationSequence[0]
        hu = src.pixel_array[j] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
        np.testing.assert_allclose(ds.pixel_array[k], (hu - lo) / (hi - lo), atol=1e-5)


def test_a_series_without_cross_sections_is_refused(tmp_path: Path) -> None:
    files = write_dicom_series(
        ramp_volume((8, 8, 2)), tmp_path / "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]
    )
    with pytest.raises(ScanError, match="no cross-sectional source image"):
        write_saliency_map(np.zeros((8, 8, 2)), np.eye(4), files, tmp_path / "out", MODEL)
    assert not (tmp_path / "out").exists()
