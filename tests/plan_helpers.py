"""Small non-HU datasets for the planner tests: ellipsoid bodies written as real NIfTI files."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np


def _ellipsoid(
    shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]
) -> np.ndarray:
    idx = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(idx, centre, radii, strict=True)) <= 1.0


def write_dataset(
    root: Path, kind: str, spacings: list[tuple[float, float, float]] | None = None, n_per_class: int = 3
) -> Path:
    """Two classes of ellipsoid 'bodies' ('b' adds a bright blob) written as NIfTI + labels.csv.

    kind: "uint8" (background 0, body ~150, uint8 on disk) or "mask" (0/1, uint8 on disk)."""
    rng = np.random.default_rng(7)
    shape = (40, 36, 24)
    rows = []
    i = 0
    for label in ("a", "b"):
        for _ in range(n_per_class):
            body = _ellipsoid(shape, (20, 18, 12), (16 + rng.uniform(-2, 2), 13, 10))
            blob = _ellipsoid(shape, (24, 18, 12), (4, 4, 3)) if label == "b" else np.zeros(shape, bool)
            if kind == "uint8":
                arr = np.where(body, rng.normal(150, 15, shape), 0.0)
                arr[blob] = 240
                data = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
            else:
                data = (body & ~blob).astype(np.uint8)
            sp = spacings[i % len(spacings)] if spacings else (1.0, 1.0, 1.5)
            img = nib.Nifti1Image(data, np.diag([*sp, 1.0]))
            img.header.set_xyzt_units("mm")
            nib.save(img, str(root / f"s{i}.nii.gz"))
            rows.append([f"s{i}.nii.gz", label])
            i += 1
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label"], *rows])
    return root
