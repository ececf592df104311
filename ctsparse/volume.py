"""Volume: a CT scan in Hounsfield units on a grid with a known geometry.

Canonical frame (the same for every reader): world coordinates are RAS+ millimetres (+x toward
the patient's Right, +y Anterior, +z Superior; DICOM's LPS with x and y negated), and the array axes
are permuted and flipped to the closest-canonical order, as nibabel's ``as_closest_canonical``
does: axis 0 increases toward R, axis 1 toward A, axis 2 toward S. The 4x4 affine maps voxel
indices to RAS+ mm; its 3x3 part is a positive diagonal unless the acquisition is oblique or
tilted. The same scan read from NIfTI and from DICOM gives the same array, spacing and affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Volume:
    """A CT volume.

    Attributes:
        array: float32 HU values, shape (X, Y, Z), closest-canonical RAS+ axis order.
        affine: 4x4 float64, voxel index -> RAS+ mm.
        source: the path it was read from.
        meta: non-identifying metadata (modality, series UID, warnings, vendor, ...). Never
            patient identifiers unless the user asked for them.
    """

    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.array.shape
        return (int(s[0]), int(s[1]), int(s[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def warnings(self) -> list[str]:
        return list(self.meta.get("warnings", []))
