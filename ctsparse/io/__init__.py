"""Scan readers and writers: ``read_volume`` turns a NIfTI file, a MetaImage, a DICOM file or a DICOM folder
into a Volume in the canonical RAS+ frame, or raises ScanError with a one-line reason."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ctsparse.errors import ScanError
from ctsparse.io.discover import find_scans, is_scan_path
from ctsparse.io.metaimage import METAIMAGE_DATA_SUFFIXES, is_metaimage_name
from ctsparse.io.nifti import is_nifti_name
from ctsparse.io.write import write_dicom_series, write_nifti
from ctsparse.volume import Volume

__all__ = ["find_scans", "is_scan_path", "read_volume", "write_dicom_series", "write_nifti"]


def read_volume(
    path: str | Path,
    *,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    spacing: Sequence[float] | None = None,
    files: Sequence[Path] | None = None,
) -> Volume:
    """Read one scan: ``.nii``/``.nii.gz`` -> NIfTI, ``.mhd``/``.mha`` -> MetaImage, a folder ->
    DICOM series, any other file -> DICOM.

    Args:
        series_uid: in a folder with several series, the SeriesInstanceUID to read (default: the
            largest CT series; the others are listed in ``meta["skipped"]``).
        allow_non_ct: read DICOM (or a MetaImage header) whose Modality is not CT instead of
            refusing it.
        spacing: resample to this voxel size (mm per RAS+ axis) while reading; the same grid and
            values as reading and then ``sparsify.resample`` (``ctsparse.io.resample``), but a
            DICOM series is resampled slice by slice, so its full-resolution float32 volume never
            exists. ``meta["resampled_from"]`` keeps the original shape and spacing.
        files: for a DICOM folder, the files of the series to read (``SeriesInfo.files`` from
            ``ctsparse.io.dicom_listing``), so the folder's other files are not parsed again.

    Raises:
        ScanError: unreadable, or not CT (``NotCTError``) unless allow_non_ct.
    """
    p = Path(path)
    if not p.exists():
        raise ScanError(p, "no such file or folder")
    if p.is_file() and is_nifti_name(p):
        from ctsparse.io.nifti import read_nifti

        return read_nifti(p, spacing=spacing)
    if p.is_file() and p.suffix.lower() in METAIMAGE_DATA_SUFFIXES:
        raise ScanError(p, "raw voxels without their geometry: pass the MetaImage header (.mhd) naming it")
    if p.is_file() and is_metaimage_name(p):
        from ctsparse.io.metaimage import read_metaimage

        return read_metaimage(p, spacing=spacing, allow_non_ct=allow_non_ct)
    if p.is_dir() or p.is_file():
        from ctsparse.io.dicom import read_dicom

        try:
            return read_dicom(
                p, series_uid=series_uid, allow_non_ct=allow_non_ct, spacing=spacing, files=files
            )
        except PermissionError:
            raise ScanError(p, "permission denied") from None
        except MemoryError:
            raise ScanError(p, "not enough memory to load this scan") from None
    raise ScanError(p, "neither a file nor a folder")
