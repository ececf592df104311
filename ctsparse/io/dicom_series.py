"""Slices of one series -> a HU array and an affine: filter, sort, check spacing and tilt, decode.

Every check that drops something writes one line into ``notes`` so the caller can put it in
``Volume.meta``; only situations with no defensible answer raise ScanError.

With a target spacing, each slice is resampled in-plane as it is decoded and the stack along the
slice axis at the end (``ctsparse.io.resample``: centred grid, area average), so a 512x512x300
series read at 3.65 mm never holds its full-resolution float32 volume.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ctsparse.errors import ScanError
from ctsparse.io.dicom_headers import Slice, slice_thickness
from ctsparse.io.dicom_pixels import InPlane, Notes, decode
from ctsparse.io.geometry import LPS_RAS, canonicalize, dicom_affine_lps, ortho, slice_normal
from ctsparse.io.resample import RATIO_TOL, apply_axis, axis_weights, index_map

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
# A gap wider than this many slice intervals is a separate block (e.g. a stray slice far away),
# not missing slices to interpolate.
MAX_GAP_SLICES = 10.0
# Shear of the slice stack (lateral mm per mm along the normal) above which it is a gantry tilt.
TILT_TOLERANCE = 1e-3


def _labels(slices: list[Slice], limit: int = 3) -> str:
    names = [s.label for s in slices[:limit]]
    return ", ".join(names) + (f", ... ({len(slices)} in all)" if len(slices) > limit else "")


def _geometry_key(s: Slice) -> tuple[object, ...]:
    assert s.iop is not None and s.pixel_spacing is not None
    return (tuple(np.round(s.iop, 2)), s.rows, s.cols, tuple(np.round(s.pixel_spacing, 3)))


def _majority_geometry(slices: list[Slice], source: Path, notes: Notes) -> list[Slice]:
    """Keep the slices that share the most common orientation, size and pixel spacing."""
    counts = Counter(_geometry_key(s) for s in slices)
    ranked = counts.most_common()
    if len(ranked) == 1:
        return slices
    if ranked[0][1] == ranked[1][1] and ranked[0][1] > 1:
        raise ScanError(
            source,
            f"series mixes {ranked[0][1]} and {ranked[1][1]} slices of different orientation or size; "
            "cannot tell which one is the scan",
        )
    best = ranked[0][0]
    dropped = [s for s in slices if _geometry_key(s) != best]
    kind = "probably a localizer" if len(dropped) == 1 else "minority orientation/size"
    notes.skipped.append(
        f"{len(dropped)} slice(s) with a different orientation or size ({kind}): {_labels(dropped)}"
    )
    notes.warnings.append(
        f"dropped {len(dropped)} slice(s) whose orientation or size differs from the series"
    )
    return [s for s in slices if _geometry_key(s) == best]


def _dedupe(slices: list[Slice], t: F64, notes: Notes) -> npt.NDArray[np.bool_]:
    diffs = np.diff(t)
    steps = diffs[diffs > 1e-4]
    ref = float(np.median(steps)) if steps.size else 0.0
    dup = np.concatenate([[False], diffs <= max(1e-4, 0.05 * ref)])
    if dup.any():
        notes.warnings.append(
            f"{int(dup.sum())} slice(s) repeat a position already present; kept the one with the lowest "
            f"InstanceNumber, skipped {_labels([s for s, d in zip(slices, dup, strict=True) if d])}"
        )
    return np.asarray(~dup)


def _largest_block(t: F64, spacing: float, notes: Notes) -> slice:
    cuts = np.flatnonzero(np.diff(t) > MAX_GAP_SLICES * spacing) + 1
    if cuts.size == 0:
        return slice(0, len(t))
    bounds = [0, *cuts.tolist(), len(t)]
    blocks = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    best = max(blocks, key=lambda b: b.stop - b.start)
    for b in blocks:
        if b != best:
            notes.skipped.append(
                f"{b.stop - b.start} slice(s) at {t[b.start]:.2f}..{t[b.stop - 1]:.2f} mm along the normal, "
                "separated from the main block by a large gap"
            )
    notes.warnings.append(
        f"slice positions form {len(blocks)} blocks separated by gaps > {MAX_GAP_SLICES:g} slice intervals; "
        f"kept the largest ({best.stop - best.start} slices)"
    )
    return best


def _regular_grid(t: F64, spacing: float, data: F32, source: Path, notes: Notes) -> tuple[F32, float]:
    """Resample onto evenly spaced positions when slices are missing or unevenly spaced."""
    diffs = np.diff(t)
    if np.all(np.abs(diffs - spacing) <= max(0.02 * spacing, 0.01)):
        return data, float((t[-1] - t[0]) / (len(t) - 1))
    n_new = round(float(t[-1] - t[0]) / spacing) + 1
    new_spacing = float((t[-1] - t[0]) / (n_new - 1))
    grid = t[0] + new_spacing * np.arange(n_new)
    hi = np.clip(np.searchsorted(t, grid, side="left"), 1, len(t) - 1)
    lo = hi - 1
    w = np.clip((grid - t[lo]) / (t[hi] - t[lo]), 0.0, 1.0)
    near = np.minimum(np.abs(grid - t[lo]), np.abs(grid - t[hi])) <= 0.02 * new_spacing
    synthesized = int((~near).sum())
    if synthesized > len(t):
        raise ScanError(
            source, f"too many missing or irregular slices ({synthesized} of {n_new} positions absent)"
        )
    out = np.empty((n_new, *data.shape[1:]), dtype=np.float32)
    for k in range(n_new):
        if w[k] < 1e-6:
            out[k] = data[lo[k]]
        elif w[k] > 1 - 1e-6:
            out[k] = data[hi[k]]
        else:
            out[k] = data[lo[k]] * (1.0 - w[k]) + data[hi[k]] * w[k]
    gaps = [
        f"{diffs[i]:.2f} mm after {t[i]:.2f} mm"
        for i in np.flatnonzero(np.abs(diffs - spacing) > 0.02 * spacing)
    ]
    notes.warnings.append(
        f"uneven slice spacing (expected {spacing:.3f} mm): gaps of {'; '.join(gaps[:5])}"
        f"{' ...' if len(gaps) > 5 else ''}; {synthesized} slice(s) interpolated"
    )
    return out, new_spacing


def _canonical_order(values: Sequence[float], ornt: F64) -> list[float]:
    """Per stored axis (column, row, slice) -> per canonical RAS+ axis."""
    out = [0.0, 0.0, 0.0]
    for a in range(3):
        out[int(ornt[a, 0])] = float(values[a])
    return out


def _in_plane(s: Slice, spacing: Sequence[float] | None) -> tuple[InPlane, F64, list[float] | None]:
    """Layout of the decoded slices: flips toward RAS+ and optional in-plane resampling.

    Returns the plan, the orientation (nibabel ornt of the stored column, row and slice axes) and
    the target spacing of each stored axis (None without resampling).
    """
    assert s.iop is not None and s.pixel_spacing is not None
    approx = LPS_RAS @ dicom_affine_lps(s.iop, np.zeros(3), s.pixel_spacing, slice_normal(s.iop))
    ornt = np.asarray(ortho.io_orientation(approx), dtype=np.float64)
    plane = InPlane(s.rows, s.cols, flip_rows=bool(ornt[1, 1] < 0), flip_cols=bool(ornt[0, 1] < 0))
    if spacing is None:
        return plane, ornt, None
    target = [float(spacing[int(ornt[a, 0])]) for a in range(3)]
    col_ratio, row_ratio = target[0] / s.pixel_spacing[1], target[1] / s.pixel_spacing[0]
    if abs(col_ratio - 1.0) > RATIO_TOL:
        weights, offset = axis_weights(s.cols, col_ratio)
        plane.col_weights = weights[np.arange(weights.shape[0])[::-1]] if plane.flip_cols else weights
        plane.col_map = (col_ratio, offset)
    if abs(row_ratio - 1.0) > RATIO_TOL:
        weights, offset = axis_weights(s.rows, row_ratio)
        plane.row_weights = weights[np.arange(weights.shape[0])[::-1]] if plane.flip_rows else weights
        plane.row_map = (row_ratio, offset)
    return plane, ornt, target


def assemble(
    slices: list[Slice], source: Path, target_spacing: Sequence[float] | None = None
) -> tuple[F32, F64, list[Slice], Notes]:
    """Build the canonical HU array and RAS+ affine of one series from its slices.

    Args:
        target_spacing: resample to this voxel size (mm per canonical RAS+ axis) while decoding.
    """
    notes = Notes()
    scouts = [s for s in slices if s.localizer]
    if scouts:
        notes.skipped.append(f"{len(scouts)} localizer/scout image(s): {_labels(scouts)}")
    slices = [s for s in slices if not s.localizer]
    if not slices:
        raise ScanError(source, "only localizer (scout) images, no cross-sectional slices")

    placed = [s for s in slices if s.ipp is not None and s.iop is not None]
    if not placed and len(slices) == 1:
        notes.warnings.append("no ImagePositionPatient/ImageOrientationPatient: identity geometry assumed")
        slices[0].ipp, slices[0].iop = np.zeros(3), np.array([1.0, 0, 0, 0, 1, 0])
        placed = slices
    elif len(placed) < len(slices):
        if not placed:
            raise ScanError(
                source, "no slice has ImagePositionPatient/ImageOrientationPatient; cannot order them"
            )
        missing = [s for s in slices if s not in placed]
        notes.skipped.append(f"{len(missing)} image(s) without position/orientation: {_labels(missing)}")
    for s in placed:
        if s.pixel_spacing is None:
            s.pixel_spacing = (1.0, 1.0)
            if "PixelSpacing is missing: 1 mm assumed" not in notes.warnings:
                notes.warnings.append("PixelSpacing is missing: 1 mm assumed")
    slices = _majority_geometry(placed, source, notes)

    iop = slices[0].iop
    assert iop is not None
    normal = slice_normal(iop)
    ipp = np.array([s.ipp for s in slices], dtype=np.float64)
    t = ipp @ normal
    # Sorted by position along the normal: filenames and InstanceNumber are unreliable across vendors.
    order = np.lexsort((np.array([s.instance for s in slices]), t))
    slices, ipp, t = [slices[i] for i in order], ipp[order], t[order]
    keep = _dedupe(slices, t, notes)
    slices, ipp, t = [s for s, k in zip(slices, keep, strict=True) if k], ipp[keep], t[keep]

    plane, ornt, target = _in_plane(slices[0], target_spacing)
    decoded, data = decode(slices, source, notes, plane)
    if len(decoded) < len(slices):
        idx = [i for i, s in enumerate(slices) if any(s is d for d in decoded)]
        slices, ipp, t = decoded, ipp[idx], t[idx]

    if len(slices) == 1:
        spacing = slice_thickness(slices[0]) or 1.0
        if slice_thickness(slices[0]) is None:
            notes.warnings.append("single slice without SliceThickness: 1 mm assumed")
        step = normal * spacing
    else:
        spacing = float(np.median(np.diff(t)))
        block = _largest_block(t, spacing, notes)
        slices, ipp, t, data = slices[block], ipp[block], t[block], data[block]
        if len(slices) > 1:
            spacing = float(np.median(np.diff(t)))
        step = normal * spacing
        if len(slices) > 1:
            data, spacing = _regular_grid(t, spacing, data, source, notes)
            dt, dp = t - t[0], ipp - ipp[0]
            along = (dp * dt[:, None]).sum(axis=0) / float((dt**2).sum())  # mm moved per mm along normal
            lateral = along - normal * float(along @ normal)
            if np.linalg.norm(lateral) > TILT_TOLERANCE:
                angle = float(np.degrees(np.arctan(np.linalg.norm(lateral))))
                notes.warnings.append(
                    f"gantry tilt: slices are sheared by {angle:.2f} degrees; the affine keeps the shear"
                )
                step = along / float(along @ normal) * spacing
            else:
                step = normal * spacing
    tilt = slices[0].header.get("GantryDetectorTilt")
    try:
        tilt_value = float(tilt) if tilt is not None else 0.0
    except (TypeError, ValueError):
        tilt_value = 0.0
    if tilt_value != 0.0 and not any(w.startswith("gantry tilt") for w in notes.warnings):
        notes.warnings.append(
            f"GantryDetectorTilt is {tilt_value:g} degrees but slice positions follow the normal"
        )

    pixel_spacing = slices[0].pixel_spacing
    assert pixel_spacing is not None
    affine = LPS_RAS @ dicom_affine_lps(iop, ipp[0], pixel_spacing, step)
    if target is not None:
        notes.resampled_from = {
            "shape": [int(n) for n in _canonical_order([slices[0].cols, slices[0].rows, len(slices)], ornt)],
            "spacing": _canonical_order(
                [pixel_spacing[1], pixel_spacing[0], float(np.linalg.norm(affine[:3, 2]))], ornt
            ),
        }
    affine = affine @ plane.index_map()
    if target is not None:
        ratio = target[2] / float(np.linalg.norm(affine[:3, 2]))
        if abs(ratio - 1.0) > RATIO_TOL:
            weights, offset = axis_weights(data.shape[0], ratio)
            data = apply_axis(data, weights, 0)
            affine = affine @ index_map([None, None, (ratio, offset)])
    # (slice, row, column) -> (column i, row j, slice k), the axis order of the affine. The in-plane
    # axes already point toward RAS+ (the decoder flipped them), so this is usually a view.
    array, affine = canonicalize(data.transpose(2, 1, 0), affine)
    return array, affine, slices, notes
