"""Geometry shared by the readers and writers: closest-canonical reorientation and DICOM frames.

DICOM positions are LPS mm (+x Left, +y Posterior, +z Superior); the Volume frame is RAS+, so x
and y are negated. Both readers end in ``canonicalize`` so that the same scan stored as NIfTI or
as DICOM gives the same array and affine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nibabel.orientations as _orientations
import numpy as np
import numpy.typing as npt

# nibabel ships no type hints
ortho: Any = _orientations

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

# Flips x and y; its own inverse, so it maps LPS -> RAS and RAS -> LPS.
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_IDENTITY_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


def canonicalize(array: npt.NDArray[np.floating], affine: F64) -> tuple[F32, F64]:
    """Permute and flip axes to the closest RAS+ order, as ``nibabel.as_closest_canonical`` does.

    The result has positive strides but keeps the memory order of the input (C or Fortran): a
    C-order copy of a transposed 300x512x512 volume costs seconds, an order-keeping copy does not.
    """
    ornt = ortho.io_orientation(affine)
    if np.array_equal(ornt, _IDENTITY_ORNT):
        out, new_affine = array, affine
    else:
        out = ortho.apply_orientation(array, ornt)
        new_affine = affine @ ortho.inv_ornt_aff(ornt, array.shape)
    if out.dtype != np.float32 or any(s < 0 for s in out.strides):
        out = np.array(out, dtype=np.float32, order="K")
    return out, np.asarray(new_affine, dtype=np.float64)


def slice_normal(iop: F64) -> F64:
    """Unit normal of a slice from ImageOrientationPatient (row cosines x column cosines)."""
    n = np.cross(iop[:3], iop[3:])
    return np.asarray(n / np.linalg.norm(n), dtype=np.float64)


def dicom_affine_lps(iop: F64, ipp0: F64, pixel_spacing: tuple[float, float], step: F64) -> F64:
    """Voxel (column i, row j, slice k) -> LPS mm.

    PixelSpacing is [spacing between rows, spacing between columns]: moving one column (i + 1)
    goes along the row cosines by PixelSpacing[1]; one row (j + 1) along the column cosines by
    PixelSpacing[0]. ``step`` is the displacement from one slice to the next (not necessarily
    along the normal: a gantry tilt shears it).
    """
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * pixel_spacing[1]
    affine[:3, 1] = iop[3:] * pixel_spacing[0]
    affine[:3, 2] = step
    affine[:3, 3] = ipp0
    return affine


def flip_axis(
    array: npt.NDArray[np.floating], affine: F64, axis: int
) -> tuple[npt.NDArray[np.floating], F64]:
    """Reverse one array axis and update the affine so every voxel keeps its world position."""
    new = affine.copy()
    new[:3, 3] += affine[:3, axis] * (array.shape[axis] - 1)
    new[:3, axis] = -affine[:3, axis]
    return np.flip(array, axis=axis), new


def transpose_axes(
    array: npt.NDArray[np.floating], affine: F64, order: tuple[int, int, int]
) -> tuple[npt.NDArray[np.floating], F64]:
    """Permute array axes (numpy ``transpose`` order) and the affine columns with them."""
    new = affine.copy()
    new[:3, :3] = affine[:3, list(order)]
    return np.transpose(array, order), new


def axis_index_maps(
    to_other: npt.ArrayLike, shape: Sequence[int], other_shape: Sequence[int]
) -> tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.bool_]]] | None:
    """Nearest indices between two grids related by a map that scales and shifts each axis on
    its own (crop, resampling and patches never rotate).

    to_other: 4x4, index on this grid -> index on the other. Returns, per axis, the other grid's
    nearest index of every index along this one (clipped into the other grid) and whether it
    lies inside it; None when the map mixes axes.
    """
    t = np.asarray(to_other, dtype=np.float64)
    lin = t[:3, :3]
    if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-9):
        return None
    idx, inside = [], []
    for a in range(3):
        i = np.rint(lin[a, a] * np.arange(shape[a]) + t[a, 3]).astype(np.int64)
        inside.append((i >= 0) & (i < other_shape[a]))
        idx.append(np.clip(i, 0, other_shape[a] - 1))
    return idx, inside


def inside_grid(inside: Sequence[npt.NDArray[np.bool_]]) -> npt.NDArray[np.bool_]:
    """The 3D mask of axis_index_maps' per-axis `inside` flags: cells inside along every axis."""
    out: npt.NDArray[np.bool_] = (
        inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    )
    return out
