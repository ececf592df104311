"""NIfTI reader: nibabel image -> Volume in the canonical RAS+ frame.

Policy for NaN/inf voxels: the scan is refused (ScanError). A CT in HU has no legitimate NaN; they
come from resampling pipelines and silently turning them into air would hide that.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as _nib
import numpy as np
import numpy.typing as npt

from ctsparse.errors import ScanError
from ctsparse.io.geometry import canonicalize, ortho
from ctsparse.volume import Volume

nib: Any = _nib  # nibabel ships no type hints

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# nibabel leaves the affine in the file's units; the Volume frame is millimetres.
_UNIT_TO_MM = {"meter": 1000.0, "micron": 1e-3}


def is_nifti_name(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:160]


def read_nifti(path: str | Path, spacing: Sequence[float] | None = None) -> Volume:
    """Read a .nii/.nii.gz CT volume in HU (scl_slope/scl_inter applied by nibabel), resampled to
    `spacing` (mm per RAS+ axis) if given."""
    path = Path(path)
    try:
        img: Any = nib.load(str(path))
    except (EOFError, zlib.error) as exc:
        raise ScanError(path, f"truncated or corrupt NIfTI file ({_one_line(exc)})") from None
    except Exception as exc:  # nibabel raises many types (ImageFileError, HeaderDataError, OSError)
        raise ScanError(path, f"not a readable NIfTI file ({_one_line(exc)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ScanError(path, f"not a NIfTI image ({type(img).__name__})")

    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        shape = shape[:3]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) != 3:
        raise ScanError(
            path, f"expected a 3D volume, got shape {tuple(img.shape)} (4D series are not supported)"
        )
    if np.dtype(img.get_data_dtype()).kind not in "biuf":
        raise ScanError(path, f"unsupported NIfTI data type {img.get_data_dtype()}")

    try:
        data = img.get_fdata(dtype=np.float32)
    except (EOFError, zlib.error) as exc:
        raise ScanError(path, f"truncated or corrupt NIfTI data ({_one_line(exc)})") from None
    except Exception as exc:
        raise ScanError(
            path, f"cannot read NIfTI voxel data: file truncated or corrupt ({_one_line(exc)})"
        ) from None
    data = data.reshape(shape)
    value_notes = value_warnings(data, path)

    warnings: list[str] = []
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(path, "the NIfTI affine is singular or not finite")
    unit = img.header.get_xyzt_units()[0]
    if unit in _UNIT_TO_MM:
        affine[:3, :] *= _UNIT_TO_MM[unit]
        warnings.append(f"spatial units were '{unit}'; converted to mm")
    warnings += value_notes

    meta: dict[str, Any] = {
        "format": "nifti",
        "modality": "unknown",
        "n_files": 1,
        "warnings": warnings,
        "skipped": [],
        "sform_code": int(img.header["sform_code"]),
        "qform_code": int(img.header["qform_code"]),
    }
    return oriented_volume(data, affine, path, meta, spacing)


def value_warnings(data: npt.NDArray[np.float32], path: Path) -> list[str]:
    """A single-file scan's voxel values: refused with NaN or infinite voxels (see the module
    docstring); a warning when none is negative (not HU, perhaps)."""
    bad = ~np.isfinite(data)
    if bad.any():
        raise ScanError(path, f"{int(bad.sum())} voxels are NaN or infinite; a CT in HU should have none")
    if data.size and float(data.min()) >= 0.0:
        return ["no negative values: the data may not be in HU (air is about -1000 HU)"]
    return []


def oriented_volume(
    data: npt.NDArray[np.float32],
    affine: npt.NDArray[np.float64],
    path: Path,
    meta: dict[str, Any],
    spacing: Sequence[float] | None,
) -> Volume:
    """A single-file scan's array (stored axis order, `affine` to RAS+ mm) as a Volume: resampled
    to `spacing` (mm per RAS+ axis) when given, then in the canonical RAS+ axis order;
    meta["resampled_from"] keeps the stored shape and spacing when the grid changed."""
    resampled_from: dict[str, list[Any]] = {}
    if spacing is not None:
        # in the stored axis order, before canonicalize: its reorienting copy then runs on the
        # small grid (the centred grid commutes with flips, see ctsparse.io.resample)
        from ctsparse.io.resample import resample_array

        ornt = ortho.io_orientation(affine)
        target = [float(spacing[int(ornt[a, 0])]) for a in range(3)]
        old = np.linalg.norm(affine[:3, :3], axis=0)
        resampled_from = {"shape": [0, 0, 0], "spacing": [0.0, 0.0, 0.0]}
        for a in range(3):
            resampled_from["shape"][int(ornt[a, 0])] = int(data.shape[a])
            resampled_from["spacing"][int(ornt[a, 0])] = float(old[a])
        data, affine = resample_array(data, affine, target)
    array, affine = canonicalize(data, affine)
    # a new spacing can keep the shape (e.g. 10.0 -> 10.5 mm over 32 voxels): recorded all the same
    new_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if resampled_from and (
        resampled_from["shape"] != list(array.shape)
        or not np.allclose(resampled_from["spacing"], new_spacing, rtol=1e-6)
    ):
        meta["resampled_from"] = resampled_from
    return Volume(array=array, affine=affine, source=str(path), meta=meta)
