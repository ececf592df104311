"""Anatomical regions that restrict which voxels become sparse sites.

``lungs``: the lung fields with everything inside them (vessels, airways, nodules), found the way
lung-nodule CAD pipelines (e.g. the LUNA16 preprocessing) do it:

1. air inside the body: HU < `LUNG_AIR_HU` within the filled body outline (room air, the table
   and the gap under the patient are outside it);
2. the lung components: 26-connected components of that air holding at least `MIN_LUNG_ML` and at
   least a tenth of the largest one (drops bowel gas and small air pockets, keeps two separate
   lungs or one joined lung field);
3. a morphological closing with a ball of `closing_mm` radius, then in-plane hole filling: a
   nodule or a vessel is soft tissue surrounded by lung, so it is a hole in the air mask, and a
   juxta-pleural nodule is a dent in its outline that the closing fills;
4. a dilation of one voxel, so that the partial-volume rim of a structure at the lung's edge
   stays inside.

The region is computed on the grid the classifier sees (after resampling), so its cost follows
that grid, not the scan's native one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]

LUNG_AIR_HU = -400.0  # aerated lung is -950..-600; emphysema and air lower, soft tissue higher
MIN_LUNG_ML = 50.0  # smaller than any lung, larger than most bowel gas pockets


class NoRegionError(ValueError):
    """The requested region is not in the scan (e.g. no lungs in a head CT)."""


def _ball(radius_mm: float, spacing: Sequence[float]) -> BoolArray:
    r = [max(int(np.floor(radius_mm / s)), 0) for s in spacing]
    grids = np.ogrid[tuple(slice(-n, n + 1) for n in r)]
    dist = sum((g * s / max(radius_mm, 1e-6)) ** 2 for g, s in zip(grids, spacing, strict=True))
    return np.asarray(dist <= 1.0)


def lung_region(
    hu: FloatArray, body: BoolArray, spacing: Sequence[float], closing_mm: float = 10.0
) -> BoolArray:
    """Mask of the lung fields (with their contents) inside `body`, same shape as `hu`.

    Raises:
        NoRegionError: no air component inside the body is large enough to be a lung.
    """
    from scipy import ndimage

    from ctsparse.sparsify import bounding_box, fill_holes_in_plane

    air = (hu < LUNG_AIR_HU) & body
    box = bounding_box(air)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if box is None:
        raise NoRegionError("no air inside the body: no lungs in this scan")
    ball = _ball(closing_mm, spacing)
    pad = [(b // 2) + 2 for b in ball.shape]
    # the box around the air, padded so that the closing does not erode at the array border
    lo = [max(a - p, 0) for (a, _), p in zip(box, pad, strict=True)]
    hi = [min(b + p, n) for (_, b), p, n in zip(box, pad, hu.shape, strict=True)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    lab, n = ndimage.label(air[sl], structure=np.ones((3, 3, 3), dtype=bool))
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    counts[0] = 0
    largest = int(counts.max()) if n else 0
    if largest * voxel_ml < MIN_LUNG_ML:
        raise NoRegionError(
            f"no lungs found: the largest air region inside the body is {largest * voxel_ml:.0f} mL "
            f"(a lung field is at least {MIN_LUNG_ML:.0f} mL)"
        )
    keep_label = (counts >= max(largest / 10.0, MIN_LUNG_ML / voxel_ml)) & (counts > 0)
    lungs = keep_label[lab]
    padded = np.pad(lungs, [(p, p) for p in pad])
    closed = ndimage.binary_closing(padded, structure=ball)
    closed = closed[tuple(slice(p, -p) for p in pad)]
    closed = fill_holes_in_plane(closed)
    closed = ndimage.binary_dilation(closed, structure=ndimage.generate_binary_structure(3, 1))
    out = np.zeros(hu.shape, dtype=bool)
    out[sl] = closed & body[sl]
    return out
