"""Writers: a Volume -> a NIfTI file or a CT DICOM series (real files, for tests and phantoms).

The DICOM series is written the way scanners do it: int16/uint16 stored values with
RescaleSlope/Intercept, geometry in LPS, in-plane axes pointing to +L/+P (+S rows run head to
foot in coronal/sagittal), so reading it back exercises the reader's reorientation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as _nib
import numpy as np
import numpy.typing as npt
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from ctsparse.io.geometry import LPS_RAS, flip_axis, transpose_axes
from ctsparse.volume import Volume

nib: Any = _nib  # nibabel ships no type hints

F64 = npt.NDArray[np.float64]
_SLICE_ORDER = {2: (0, 1, 2), 1: (0, 2, 1), 0: (1, 2, 0)}


def write_nifti(volume: Volume, path: str | Path) -> Path:
    """Save as NIfTI-1 (.nii or .nii.gz); integer-valued HU within int16 is stored as int16 (exact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = volume.array
    data: npt.NDArray[Any] = arr
    if (
        arr.size
        and float(arr.min()) >= -32768
        and float(arr.max()) <= 32767
        and np.array_equal(arr, np.round(arr))
    ):
        data = arr.astype(np.int16)
    img = nib.Nifti1Image(data, volume.affine)
    img.set_sform(volume.affine, code=1)
    m = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    orthogonal = np.allclose(m.T @ m, np.eye(3), atol=1e-6)
    img.set_qform(volume.affine if orthogonal else None, code=1 if orthogonal else 0)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def _ds(values: F64 | list[float]) -> list[str]:
    return [format_number_as_ds(float(np.round(v, 8)) + 0.0) for v in values]  # +0.0 drops -0.0


def _storage_order(volume: Volume, slice_axis: int) -> tuple[npt.NDArray[np.float32], F64]:
    """Slices along the last axis; in-plane axes flipped to the directions scanners use."""
    arr, aff = transpose_axes(volume.array, volume.affine, _SLICE_ORDER[slice_axis])
    for axis in (0, 1):
        d = (LPS_RAS @ aff)[:3, axis]
        dominant = int(np.argmax(np.abs(d)))
        wanted_sign = -1.0 if (axis == 1 and dominant == 2) else 1.0
        if np.sign(d[dominant]) != wanted_sign:
            arr, aff = flip_axis(arr, aff, axis)
    return arr.astype(np.float32, copy=False), aff


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    modality: str = "CT",
    transfer_syntax: str = ExplicitVRLittleEndian,
    slope: float = 1.0,
    intercept: float = -1024.0,
    shuffle_names_seed: int | None = None,
    slice_axis: int = 2,
    **overrides: Any,
) -> list[Path]:
    """Write one CT Image Storage file per slice; returns the paths in slice order.

    Args:
        shuffle_names_seed: if set, file names and InstanceNumber are a random permutation of the
            slice order, to prove that readers sort by position.
        slice_axis: volume axis the slices are taken along (2 axial, 1 coronal, 0 sagittal).
        overrides: DICOM keywords set on every file after everything else (None deletes one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key in overrides:
        if tag_for_keyword(key) is None:
            raise ValueError(f"unknown DICOM keyword {key!r}")
    arr, aff = _storage_order(volume, slice_axis)
    lps = LPS_RAS @ aff
    col_spacing, row_spacing = (float(np.linalg.norm(lps[:3, a])) for a in (0, 1))
    row_cos, col_cos = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
    if abs(float(row_cos @ col_cos)) > 1e-4:
        raise ValueError("the in-plane axes are not orthogonal; DICOM cannot store this geometry")
    normal = np.cross(row_cos, col_cos)
    thickness = abs(float(lps[:3, 2] @ normal))

    lo, hi = (float(arr.min()) - intercept) / slope, (float(arr.max()) - intercept) / slope
    lo, hi = min(lo, hi), max(lo, hi)
    if lo >= -0.5 and hi <= 65535.5:
        dtype: np.dtype[Any] = np.dtype(np.uint16)
        signed = False
    elif lo >= -32768.5 and hi <= 32767.5:
        dtype, signed = np.dtype(np.int16), True
    else:
        raise ValueError(f"HU range does not fit 16 bits with slope {slope} and intercept {intercept}")

    n = arr.shape[2]
    perm = (
        np.random.default_rng(shuffle_names_seed).permutation(n)
        if shuffle_names_seed is not None
        else np.arange(n)
    )
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    # Instance and frame UIDs derive from the series UID, so a fixed series UID rewrites identical files.
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame"])
    ts = UID(transfer_syntax)
    paths = []
    for k in range(n):
        stored = np.round((arr[:, :, k].T - intercept) / slope).astype(dtype)  # (rows, columns)
        ipp = lps[:3, 3] + k * lps[:3, 2]
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "instance", str(k)])
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ts if not ts.is_compressed else ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Anonymous", "ANON", "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20000101", "000000", "1", ""
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, "ctsparse", "synthetic"
        ds.SeriesNumber, ds.InstanceNumber = 1, int(perm[k]) + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = _ds(ipp)
        ds.ImageOrientationPatient = _ds([*row_cos, *col_cos])
        ds.PixelSpacing = _ds([row_spacing, col_spacing])
        ds.SliceThickness = format_number_as_ds(round(thickness, 6))
        ds.SliceLocation = format_number_as_ds(round(float(ipp @ normal), 6))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = _ds([slope])[0], _ds([intercept])[0]
        ds.RescaleType, ds.WindowCenter, ds.WindowWidth = "HU", "40", "400"
        ds.PixelData = stored.tobytes()
        if ts.is_compressed:
            ds.compress(ts, stored, generate_instance_uid=False)
        for key, value in overrides.items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        path = folder / f"IM{int(perm[k]) + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
