"""Per-dataset medians and ranges of a fingerprint's per-scan measurements."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ctsparse.plan.fingerprint import PATCH_SIZES, Fingerprint


def median_sites(fp: Fingerprint, region: str, k: int) -> float | None:
    counts = [s.sites[region][str(k)] for s in fp.scans if s.sites and region in s.sites]
    return float(np.median(counts)) if counts else None


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def summarize(fp: Fingerprint) -> dict[str, Any]:
    """Per-dataset medians and ranges of the per-scan measurements."""
    sc = fp.scans
    axes = range(3)
    lungs = [s.lung_ml for s in sc if s.lungs_found and s.lung_ml is not None]
    return {
        "scans": {
            "total": fp.n_scans,
            "read": fp.n_read,
            "failed": len(fp.failed),
            "max_scans": fp.max_scans,
        },
        "classes": fp.class_counts,
        "read_classes": dict(sorted(Counter(s.label for s in sc).items())),
        "split": {"train": fp.n_train, "val": fp.n_val, "explicit": fp.explicit_split},
        "spacing": {
            k: [_stat([s.spacing[a] for s in sc])[k] for a in axes] for k in ("median", "min", "max")
        },
        "shape": {k: [_stat([s.shape[a] for s in sc])[k] for a in axes] for k in ("median", "min", "max")},
        "kind": fp.kind,
        "kinds": dict(Counter(s.intensity.kind for s in sc)),
        "percentiles": {
            q: _stat([s.intensity.percentiles[q] for s in sc]) for q in sc[0].intensity.percentiles
        },
        "min": _stat([s.intensity.min for s in sc]),
        "max": _stat([s.intensity.max for s in sc]),
        "frac_at_min": _stat([s.intensity.frac_at_min for s in sc]),
        "integer_valued": sum(s.intensity.integer_valued for s in sc),
        "lungs": {
            "found": len(lungs),
            "of": fp.n_read,
            "median_ml": float(np.median(lungs)) if lungs else None,
        },
        "occupancy": {t: float(np.median([s.occupancy[t] for s in sc])) for t in sc[0].occupancy},
        "sites": {
            "spacing": list(fp.analysis_spacing),
            "threshold": fp.site_threshold,
            "scans": sum(1 for s in sc if s.sites),
            **{
                region: {str(k): median_sites(fp, region, k) for k in PATCH_SIZES}
                for region in ("body", "lungs")
                if median_sites(fp, region, 1) is not None
            },
        },
        "data_threshold": fp.data_threshold,
        "foreground": fp.foreground,
    }
