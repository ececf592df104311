"""Dataset fingerprint: measurements of a dataset, no decisions (nnU-Net's fingerprint extractor).

Two passes over a seeded, class-stratified subsample of the scans:
1. each scan at its own grid: spacing, shape, value statistics (ctsparse/plan/intensity.py), and
   for HU data a lung check on a coarse copy (ctsparse/regions.py), with the strongest blob-filter
   response inside the lungs found (ctsparse/filters.py);
2. a few of them again at the dataset's median spacing: how many sparse sites survive the
   threshold that the values imply (the HU body threshold, or the histogram's Otsu threshold), in
   the body and in the lung region, for each candidate patch size.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.config import PreprocessConfig, TrainConfig
from ctsparse.data.datasets import Sample, discover_dataset, read_findings, stratified_split
from ctsparse.errors import CtsparseError, DatasetError
from ctsparse.io.geometry import axis_index_maps, inside_grid
from ctsparse.plan.intensity import Intensity, measure_intensity, otsu
from ctsparse.volume import Volume

MAX_SCANS = 24  # enough for stable medians; reading more real CTs costs seconds each
SITE_SCANS = 8  # of those, re-read at the median spacing to count sites
# The lung check runs on a copy at least this coarse: finding the lung fields (a closing with a
# 10 mm ball) at 0.7 mm would take minutes per scan, and their volume needs no fine grid.
LUNG_CHECK_MM = 3.0
PATCH_SIZES = (1, 2, 4, 8)
LUNG_TISSUE_HU = -700.0  # denser than aerated lung: vessels, nodules (the lung region's threshold)
HU_THRESHOLDS = (LUNG_TISSUE_HU, -500.0, -300.0, 200.0)  # lung-nodule, body, soft tissue, bone

Event = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ScanFacts:
    path: str
    label: str
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    intensity: Intensity
    occupancy: dict[str, float] = field(default_factory=dict)  # threshold -> share of voxels >= it
    lungs_found: bool = False
    lung_ml: float | None = None
    lung_note: str = ""
    # the strongest response of the blob (dot) filter inside the lungs, on the lung check's grid
    blob_max: float | None = None
    sites: dict[str, dict[str, int]] | None = None  # region -> patch size -> sites (pass 2 only)


@dataclass(frozen=True)
class Fingerprint:
    dataset: str
    n_scans: int
    class_counts: dict[str, int]
    n_train: int  # with the default split (explicit split columns win)
    n_val: int
    explicit_split: bool
    max_scans: int
    seed: int
    scans: tuple[ScanFacts, ...]
    failed: tuple[str, ...]
    kind: str  # the most common value kind among the read scans
    analysis_spacing: tuple[float, float, float]  # the median spacing, where sites were counted
    site_threshold: float  # the threshold the site counts used
    data_threshold: float  # Otsu on the pooled values, or the midpoint of a mask's two values
    foreground: dict[str, float]  # median, p25, p75, std of the pooled values >= site_threshold
    # scans per class that DATA/findings.csv gives finding positions for
    findings: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def n_read(self) -> int:
        return len(self.scans)

    def to_dict(self) -> dict[str, Any]:
        from ctsparse.plan.summary import summarize

        d = dataclasses.asdict(self)
        d["summary"] = summarize(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["scans"] = tuple(
            ScanFacts(
                **{
                    **s,
                    "spacing": tuple(s["spacing"]),
                    "shape": tuple(s["shape"]),
                    "intensity": Intensity(**s["intensity"]),
                }
            )
            for s in d["scans"]
        )
        kw["failed"] = tuple(d["failed"])
        kw["analysis_spacing"] = tuple(d["analysis_spacing"])
        return cls(**kw)


def select_scans(samples: list[Sample], max_scans: int, seed: int) -> list[Sample]:
    """A seeded subsample with every class in proportion (at least one each), classes interleaved
    so that any prefix of the list is mixed too."""
    rng = np.random.default_rng(seed)
    by_class = {c: [s for s in samples if s.label == c] for c in sorted({s.label for s in samples})}
    quota = {c: max(1, round(max_scans * len(g) / len(samples))) for c, g in by_class.items()}
    while sum(quota.values()) > max(max_scans, len(quota)):
        quota[max(quota, key=lambda c: quota[c])] -= 1
    picked = {c: [g[i] for i in rng.permutation(len(g))[: quota[c]]] for c, g in by_class.items()}
    out: list[Sample] = []
    for i in range(max(quota.values())):
        out += [p[i] for p in picked.values() if i < len(p)]
    return out


def _lung_check(vol: Volume) -> tuple[dict[str, Any], Any]:
    """(lungs_found, lung_ml, lung_note) and the coarse lung mask with its affine (or None)."""
    from ctsparse.masks import body_region
    from ctsparse.regions import NoRegionError, lung_region
    from ctsparse.sparsify import BODY_HU, resample

    target = [max(s, LUNG_CHECK_MM) for s in vol.spacing]
    arr, aff = resample(vol.array, vol.affine, target)
    try:
        lungs = lung_region(arr, body_region(arr >= BODY_HU), target)
    except NoRegionError as exc:
        return {"lungs_found": False, "lung_note": str(exc)}, None
    ml = float(np.count_nonzero(lungs)) * float(np.prod(target)) / 1000.0
    return {"lungs_found": True, "lung_ml": round(ml, 1), "blob_max": _blob_max(arr, lungs, target)}, (
        lungs,
        aff,
    )


def _blob_max(hu: npt.NDArray[np.float32], lungs: npt.NDArray[np.bool_], spacing: list[float]) -> float:
    """The strongest dot-filter response among the lung voxels denser than aerated lung: how
    round and how large the roundest thing in the lungs is (a nodule, else a vessel junction)."""
    from ctsparse.filters import dot_enhancement

    at = lungs & (hu >= LUNG_TISSUE_HU)
    if not at.any():
        return 0.0
    cfg = PreprocessConfig()
    return round(float(dot_enhancement(hu, spacing, cfg.blob_scales_mm, at, cfg.blob_hu_max).max()), 4)


def _occupied_blocks(grid: npt.NDArray[np.bool_]) -> dict[str, int]:
    """Occupied k^3 blocks of a site grid per patch size k: the sites patch features of size k
    would make (blocks counted from the grid's corner, as sparsify's patches are)."""
    out = {}
    for k in PATCH_SIZES:
        g = np.pad(grid, [(0, -n % k) for n in grid.shape])
        b = [n // k for n in g.shape]
        out[str(k)] = int(np.count_nonzero(g.reshape(b[0], k, b[1], k, b[2], k).any(axis=(1, 3, 5))))
    return out


def _site_counts(vol: Volume, threshold: float, body_mask: bool, lungs: Any) -> dict[str, dict[str, int]]:
    """Sites per patch size in the body and (given the coarse lung mask) in the lung region.

    The lung region is taken from the coarse check grid (nearest voxel), so its counts estimate
    what `preprocess.region: lungs` keeps on this grid. Counted on dense occupancy grids: a
    chest CT at 0.7 mm has ~20 M body sites, which cost seconds to scatter once per patch size."""
    from ctsparse.sparsify import sparsify

    cfg = PreprocessConfig(features="hu", threshold=threshold, body_mask=body_mask, window=None)
    sv = sparsify(vol, cfg)
    c = sv.coords
    grid = np.zeros(sv.grid_shape, dtype=bool)
    grid[c[:, 0], c[:, 1], c[:, 2]] = True
    out = {"body": _occupied_blocks(grid)}
    if lungs is not None:
        mask, aff = lungs
        # the lung check grid and this one are the same scan resampled: a per-axis map
        maps = axis_index_maps(np.linalg.solve(aff, sv.affine), grid.shape, mask.shape)
        if maps is None:
            raise ValueError("the lung check grid is not a per-axis scaling of the site grid")
        idx, inside = maps
        in_lungs = mask[np.ix_(*idx)] & inside_grid(inside)
        out["lungs"] = _occupied_blocks(grid & in_lungs)
    return out


def fingerprint(
    data: str | Path, max_scans: int = MAX_SCANS, seed: int = 0, on_event: Event | None = None
) -> Fingerprint:
    """Measure a labelled dataset (see the module docstring). Unreadable scans are listed, not fatal.

    Raises:
        DatasetError: no dataset, or none of the selected scans could be read.
    """
    from ctsparse.io import read_volume

    emit = on_event or (lambda kind, info: None)
    samples = discover_dataset(data)
    try:
        marked = read_findings(data)
    except DatasetError:  # e.g. a findings.csv of reports, not positions: planning needs none
        marked = {}
    default = PreprocessConfig()
    split = TrainConfig()
    train, val = stratified_split(samples, split.val_fraction, split.seed)
    chosen = select_scans(samples, max_scans, seed)
    rng = np.random.default_rng(seed)
    facts: list[dict[str, Any]] = []
    pooled: list[tuple[Any, Intensity]] = []
    lung_masks: dict[str, Any] = {}
    failed: list[str] = []
    for i, s in enumerate(chosen):
        emit("read", {"i": i + 1, "n": len(chosen), "path": str(s.path)})
        try:
            vol = read_volume(s.path)
        except (CtsparseError, MemoryError) as exc:
            failed.append(str(exc) or f"{s.path}: {type(exc).__name__}")
            continue
        info, sample = measure_intensity(vol.array, rng)
        f: dict[str, Any] = {"path": str(s.path), "label": s.label, "spacing": vol.spacing}
        f |= {"shape": vol.shape, "intensity": info}
        if info.kind == "hu":
            lung, mask = _lung_check(vol)
            f |= dict(lung)
            if mask is not None and len(facts) < SITE_SCANS:
                lung_masks[str(s.path)] = mask
        else:
            f["lung_note"] = "values are not HU"
        facts.append(f)
        pooled.append((sample, info))
    if not facts:
        raise DatasetError(data, f"none of the {len(chosen)} selected scans could be read: {failed[0]}")

    kind = Counter(f["intensity"].kind for f in facts).most_common(1)[0][0]
    # to 0.001 mm: a grid that reads well in a config, and no resampling for a 0.0004 mm difference
    spacing = tuple(float(np.round(np.median([f["spacing"][a] for f in facts]), 3)) for a in range(3))
    values = np.concatenate([s for s, _ in pooled])
    if kind == "mask":
        data_thr = (min(f["intensity"].min for f in facts) + max(f["intensity"].max for f in facts)) / 2
    else:
        data_thr = otsu(values)
    site_thr = default.threshold if kind == "hu" else float(data_thr)
    fg = values[values >= site_thr]
    fg = fg if fg.size else values
    foreground = {
        "median": float(np.median(fg)),
        "p25": float(np.percentile(fg, 25)),
        "p75": float(np.percentile(fg, 75)),
        "std": float(np.std(fg)),
    }
    thresholds = sorted({*HU_THRESHOLDS, site_thr} if kind == "hu" else {site_thr})
    for f, (sample, _) in zip(facts, pooled, strict=True):
        f["occupancy"] = {f"{t:g}": float(np.mean(sample >= t)) for t in thresholds}

    for j, f in enumerate(facts[:SITE_SCANS]):
        emit("sites", {"i": j + 1, "n": min(SITE_SCANS, len(facts)), "path": f["path"]})
        try:
            vol = read_volume(f["path"], spacing=spacing)
            f["sites"] = _site_counts(vol, site_thr, kind == "hu", lung_masks.get(f["path"]))
        except (CtsparseError, MemoryError) as exc:
            f["lung_note"] = f"{f.get('lung_note', '')}; sites not counted: {exc}".strip("; ")
    return Fingerprint(
        dataset=str(data),
        n_scans=len(samples),
        class_counts=dict(sorted(Counter(s.label for s in samples).items())),
        n_train=len(train),
        n_val=len(val),
        explicit_split=any(s.split for s in samples),
        max_scans=max_scans,
        seed=seed,
        scans=tuple(ScanFacts(**f) for f in facts),
        failed=tuple(failed),
        kind=kind,
        analysis_spacing=(spacing[0], spacing[1], spacing[2]),
        site_threshold=float(site_thr),
        data_threshold=float(data_thr),
        foreground=foreground,
        findings=dict(sorted(Counter(s.label for s in samples if s.path.resolve() in marked).items())),
    )
