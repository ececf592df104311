"""What the voxel values of a scan are: HU, 0-255, 0-1, a binary mask, z-scores or something else.

Pure numpy measurements on one array, and Otsu's threshold for a pooled histogram. The planner
(ctsparse/plan/rules.py) turns the kind into a threshold, window and normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Kind = Literal["hu", "uint8", "unit", "mask", "zscore", "other"]

PERCENTILES = (0.5, 1.0, 50.0, 99.0, 99.5)
# Voxels drawn per scan for percentiles and the pooled histogram: percentiles of 2e5 random voxels
# are within a few HU of the exact ones, at a fraction of the cost of sorting 10^8 voxels.
SAMPLE_VOXELS = 200_000
# HU: room air is -1000 (stored down to -1024, padding lower) and bone, contrast and the table
# reach well above +300; a 0-255 image, a mask or z-scores never span both.
HU_AIR_MAX = -900.0
HU_DENSE_MIN = 300.0
# z-scored data: mean within 0.25 and standard deviation within 0.5..2 of the unit normal.
ZSCORE_MEAN = 0.25
ZSCORE_SD = (0.5, 2.0)

KIND_TEXT: dict[str, str] = {
    "hu": "HU",
    "uint8": "0-255 integers",
    "unit": "0-1 floats",
    "mask": "a binary mask",
    "zscore": "z-scores (mean ~0, sd ~1)",
    "other": "not HU",
}


@dataclass(frozen=True)
class Intensity:
    """Value statistics of one scan (percentiles, mean and sd from a seeded sample of voxels)."""

    percentiles: dict[str, float]  # "p0.5", "p1", "p50", "p99", "p99.5"
    min: float
    max: float
    mean: float
    std: float
    frac_at_min: float
    integer_valued: bool
    two_valued: bool  # every sampled voxel is the minimum or the maximum
    kind: Kind

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def pct_key(q: float) -> str:
    return f"p{q:g}"


def sample_voxels(array: npt.NDArray[Any], rng: np.random.Generator, n: int = SAMPLE_VOXELS) -> Any:
    """Up to n voxels drawn with replacement (all of them when the scan is smaller)."""
    flat = np.ravel(array, order="K")  # a view for C- or Fortran-ordered arrays
    if flat.size <= n:
        return np.asarray(flat, dtype=np.float64)
    return np.asarray(flat[rng.integers(0, flat.size, n)], dtype=np.float64)


def kind_of(mn: float, mx: float, mean: float, std: float, integer: bool, two_valued: bool) -> Kind:
    if two_valued:
        return "mask"
    if mn <= HU_AIR_MAX and mx >= HU_DENSE_MIN:
        return "hu"
    if integer and mn >= 0.0 and mx <= 255.0:
        return "uint8"
    if mn >= 0.0 and mx <= 1.0:
        return "unit"
    if abs(mean) <= ZSCORE_MEAN and ZSCORE_SD[0] <= std <= ZSCORE_SD[1]:
        return "zscore"
    return "other"


def measure_intensity(array: npt.NDArray[Any], rng: np.random.Generator) -> tuple[Intensity, Any]:
    """Statistics of one scan, and the sampled voxels (for the dataset's pooled histogram)."""
    mn, mx = float(np.min(array)), float(np.max(array))
    s = sample_voxels(array, rng)
    at_min = float(np.mean(s == mn))
    integer = bool(np.all(s == np.round(s)))
    two = bool(np.all((s == mn) | (s == mx)))
    mean, std = float(np.mean(s)), float(np.std(s))
    pcts = np.percentile(s, PERCENTILES)
    info = Intensity(
        percentiles={pct_key(q): float(v) for q, v in zip(PERCENTILES, pcts, strict=True)},
        min=mn,
        max=mx,
        mean=mean,
        std=std,
        frac_at_min=at_min,
        integer_valued=integer,
        two_valued=two,
        kind=kind_of(mn, mx, mean, std, integer, two),
    )
    return info, s


def otsu(values: Any, bins: int = 256) -> float:
    """Otsu's threshold: the cut of the histogram that maximises the between-class variance, which
    separates background (air, zero fill) from the object.

    A dozen lines of numpy rather than a dependency (scikit-image) used nowhere else.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return 0.0
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mu0 - mu1) ** 2)[:-1]
    # the middle of a plateau of equal cuts (empty bins between two modes), not its first edge
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(edges[int(best[len(best) // 2]) + 1])
