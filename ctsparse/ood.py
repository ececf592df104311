"""Out-of-distribution flags: is a scan like the scans the model was trained on?

Training stores the range of a few per-scan quantities over its training split (best.pt
extra["training_ranges"]); predict compares each scan with them and lists every quantity that
falls outside, so a scan from another protocol or scanner is never answered without a warning.

>>> ranges = training_ranges([{"sites": 1000.0}, {"sites": 1500.0}])
>>> out_of_range({"sites": 4000.0}, ranges)
['sites 4000 outside training range 1000..1500']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ctsparse.sparse_volume import SparseVolume

# Beyond the training min/max, a margin of this fraction of the range (or of the value's scale,
# when the training scans all had about the same value) is still considered in range.
TOLERANCE = 0.2
# Percentiles of a quantity are stored from this many training scans on; fewer say nothing more
# than min and max.
MIN_SCANS_FOR_PERCENTILES = 100
# HU percentiles have no natural scale (0 HU is water, not "nothing"): their margin is a fraction
# of 500 HU, i.e. 100 HU at the default tolerance, well above calibration differences between
# scanners (tens of HU) and well below a missing rescale (1024 HU) or another modality.
_HU_SCALE = 500.0
QUANTITIES = (
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
    "sites",
    "occupancy",
    "region_ml",
    "hu_p1",
    "hu_p50",
    "hu_p99",
)


def scan_quantities(sv: SparseVolume) -> dict[str, float]:
    """The quantities of one scan that are available (cache files of older versions lack some)."""
    out: dict[str, float] = {"sites": float(sv.n_sites), "occupancy": float(sv.occupancy)}
    spacing = sv.stats.get("spacing_in")
    if spacing is not None:
        out.update({f"spacing_{a}_mm": float(s) for a, s in zip("xyz", spacing, strict=True)})
    for key in ("region_ml", "hu_p1", "hu_p50", "hu_p99"):
        value = sv.stats.get(key)
        if value is not None and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def training_ranges(quantities: Sequence[dict[str, float]]) -> dict[str, dict[str, Any]]:
    """{quantity: {"min", "max", "n"[, "p1", "p99"]}} over the scans that have it."""
    out: dict[str, dict[str, Any]] = {}
    for key in QUANTITIES:
        values = np.array([q[key] for q in quantities if key in q], dtype=np.float64)
        if values.size == 0:
            continue
        entry: dict[str, Any] = {
            "min": float(values.min()),
            "max": float(values.max()),
            "n": int(values.size),
        }
        if values.size >= MIN_SCANS_FOR_PERCENTILES:
            entry["p1"], entry["p99"] = (float(v) for v in np.percentile(values, [1, 99]))
        out[key] = entry
    return out


def allowed_interval(key: str, entry: dict[str, Any], tolerance: float = TOLERANCE) -> tuple[float, float]:
    lo, hi = float(entry["min"]), float(entry["max"])
    scale = _HU_SCALE if key.startswith("hu_") else max(abs(lo), abs(hi))
    margin = tolerance * max(hi - lo, scale)
    return lo - margin, hi + margin


def out_of_range(
    quantities: dict[str, float], ranges: dict[str, dict[str, Any]] | None, tolerance: float = TOLERANCE
) -> list[str]:
    """One message per quantity outside its training range widened by `tolerance`."""
    warnings = []
    for key, entry in (ranges or {}).items():
        value = quantities.get(key)
        if value is None:
            continue
        lo, hi = allowed_interval(key, entry, tolerance)
        if not lo <= value <= hi:
            warnings.append(
                f"{key} {value:.4g} outside training range {entry['min']:.4g}..{entry['max']:.4g}"
            )
    return warnings
