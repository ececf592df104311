"""Anatomical regions that restrict which voxels become sparse sites.

``lungs``: the lung fields with everything inside them (vessels, airways, nodules), found the way
lung-nodule CAD pipelines (e.g. the LUNA16 preprocessing) do it:

1. air inside the body: HU < `LUNG_AIR_HU` within the filled body outline (room air, the table
   and the gap under the patient are outside it);
2. the lung components: 26-connected components of that air that look like lungs. A head CT has
   air inside its outline too (sinuses, mastoid cells, the nasal airway and pharynx, air caught
   between the head and its holder), so a component must be
   - large for the body it sits in: at least (`LUNG_WIDTH_FRACTION` x the body's width)^3, the
     width being the square root of the body's median cross-section over the component's slices
     (an adult lung is litres, the 23 cm-wide adult chest gives ~550 mL; a 13 cm-wide head ~95
     mL, more than its largest sinus or airway), and never below `MIN_LUNG_ML`;
   - away from the body's outline: at most `NEAR_OUTLINE_MAX` of its surface within
     `OUTLINE_MM` of the air outside the body (a chest wall is thicker; air caught between a
     head and its holder, or the nasal airway behind the nostrils, touches the outside);
   - at least a tenth of the largest such component (two separate lungs or one joined field);
   and together they must fill at least `MIN_LUNG_FRACTION` of the body in the axial slices they
   span (lungs fill 20-40 % of the chest; a head's air a few percent of the head);
3. a morphological closing with a ball of `closing_mm` radius, then in-plane hole filling: a
   nodule or a vessel is soft tissue surrounded by lung, so it is a hole in the air mask, and a
   juxta-pleural nodule is a dent in its outline that the closing fills;
4. a dilation of one voxel, so that the partial-volume rim of a structure at the lung's edge
   stays inside.

A scan without such lungs (a head, a limb, an abdomen below the lung bases) raises NoRegionError
with one line saying what the largest air region was and why it is not a lung. The region is
computed on the grid the classifier sees (after resampling), so its cost follows that grid, not
the scan's native one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ctsparse.masks import bounding_box, fill_holes_in_plane

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

LUNG_AIR_HU = -400.0  # aerated lung is -950..-600; emphysema and air lower, soft tissue higher
MIN_LUNG_ML = 50.0  # smaller than any lung, larger than most bowel gas pockets
LUNG_WIDTH_FRACTION = 0.35  # a lung is at least this fraction of the body's width, cubed
OUTLINE_MM = 5.0  # thinner than any chest wall (skin, fat, ribs and intercostal muscles)
NEAR_OUTLINE_MAX = 0.1  # share of a lung's surface that may lie within OUTLINE_MM of the outside
MIN_LUNG_FRACTION = 0.08  # of the body volume in the slices the lungs span


class NoRegionError(ValueError):
    """The requested region is not in the scan (e.g. no lungs in a head CT)."""


def _ball_steps(radius_mm: float, spacing: Sequence[float], cube_first: bool = False) -> list[BoolArray]:
    """3x3x3 structuring elements whose successive dilations approximate a ball of `radius_mm`.

    Crosses and cubes alternate (an octagon-like polyhedron, within a voxel of the ball), and an
    axis drops out once its radius in voxels is reached, so anisotropic voxels get an ellipsoid.
    A few passes with 7-27 neighbours cost far less than one with a ball's hundreds: at 2 mm a
    10 mm closing takes 0.4 s instead of 2.2 s, and at 0.7 mm the ball would have 12 k offsets.
    `cube_first`: start with a cube, which for a radius of one or two voxels is the closer match
    (a voxel's edge neighbours lie within 1.5 voxels, its face neighbours within 1).
    """
    radius = [int(np.floor(radius_mm / s)) for s in spacing]
    steps = []
    for i in range(max(radius, default=0)):
        active = [a for a in range(3) if i < radius[a]]
        st = np.zeros((3, 3, 3), dtype=bool)
        for off in np.ndindex(3, 3, 3):
            d = [o - 1 for o in off]
            if any(d[a] for a in range(3) if a not in active):
                continue
            if (i + cube_first) % 2 == 0 and sum(map(abs, d)) > 1:  # a cross: face neighbours only
                continue
            st[off] = True
        steps.append(st)
    return steps


def _dilate(mask: BoolArray, steps: list[BoolArray]) -> BoolArray:
    from scipy import ndimage

    for st in steps:
        mask = ndimage.binary_dilation(mask, structure=st)
    return mask


def _erode(mask: BoolArray, steps: list[BoolArray]) -> BoolArray:
    from scipy import ndimage

    for st in steps:
        mask = ndimage.binary_erosion(mask, structure=st, border_value=1)
    return mask


def _near(mask: BoolArray, mm: float, sp: Sequence[float], f: Sequence[int]) -> BoolArray:
    """Voxels within about `mm` of `mask` (an approximate ball, see _ball_steps; a distance
    transform costs 4x more), on blocks f (block_factors) when they are larger than a voxel."""
    if max(f) == 1:
        return _dilate(mask, _ball_steps(mm, sp, cube_first=True))
    csp = [s * k for s, k in zip(sp, f, strict=True)]
    near = _dilate(_pool(mask, f), _ball_steps(mm, csp, cube_first=True))
    return mask | _unpool(near, f, mask.shape)


def _lung_labels(
    lab: IntArray,
    n: int,
    body: BoolArray,
    body_area_cm2: npt.NDArray[np.float64],
    z0: int,
    sp: list[float],
    f: Sequence[int],
) -> list[int]:
    """Labels of `lab` (components of the air inside `body`, both cut to the same box starting at
    slice `z0` of the scan) that are lungs by the rules of the module docstring.

    Raises:
        NoRegionError: none is, with the reason for the largest air region.
    """
    from scipy import ndimage

    voxel_ml = float(np.prod(sp)) / 1000.0
    counts = np.bincount(lab.ravel(), minlength=n + 1)
    counts[0] = 0
    largest = int(np.argmax(counts))
    # distance to the nearest voxel outside the body; the array's edges are not outside (a chest
    # CT cuts the body at the top and bottom of its field of view)
    air = lab > 0
    surface = air & ~ndimage.binary_erosion(air)  # each component's boundary voxels
    surf = np.bincount(lab[surface], minlength=n + 1)
    near = np.zeros(n + 1, dtype=np.int64)
    if not body.all():
        # body voxels within OUTLINE_MM of the outside
        close_to_outside = _near(~body, OUTLINE_MM, sp, f)
        near = np.bincount(lab[surface & close_to_outside], minlength=n + 1)
    objects = ndimage.find_objects(lab)
    ok: dict[int, float] = {}
    why: dict[int, str] = {}
    for i in (int(k) for k in np.flatnonzero(counts * voxel_ml >= MIN_LUNG_ML)):
        ml = float(counts[i]) * voxel_ml
        zs = objects[i - 1][2]
        width_cm = float(np.sqrt(np.median(body_area_cm2[z0 + zs.start : z0 + zs.stop])))
        need = max(MIN_LUNG_ML, (LUNG_WIDTH_FRACTION * width_cm) ** 3)
        if near[i] > NEAR_OUTLINE_MAX * surf[i]:
            why[i] = f"lies along the body's outline ({100 * near[i] / surf[i]:.0f}% of its surface within "
            why[i] += f"{OUTLINE_MM:g} mm of the outside): air caught inside the outline, not a lung"
        elif ml < need:
            why[i] = f"is too small for a lung of a body {width_cm:.0f} cm across (at least {need:.0f} mL)"
        else:
            ok[i] = ml
    if not ok:
        reason = why.get(largest, f"is smaller than any lung (at least {MIN_LUNG_ML:.0f} mL)")
        ml = float(counts[largest]) * voxel_ml
        raise NoRegionError(f"no lungs found: the largest air region inside the body ({ml:.3g} mL) {reason}")
    biggest = max(ok.values())
    keep = [i for i, ml in ok.items() if ml >= biggest / 10.0]
    span = np.zeros(len(body_area_cm2), dtype=bool)
    for i in keep:
        zs = objects[i - 1][2]
        span[z0 + zs.start : z0 + zs.stop] = True
    body_ml = float(body_area_cm2[span].sum()) * sp[2] / 10.0
    fraction = sum(ok[i] for i in keep) / body_ml
    if fraction < MIN_LUNG_FRACTION:
        raise NoRegionError(
            f"no lungs found: the air regions large enough to be lungs fill {100 * fraction:.1f}% of the "
            f"body in their slices (lungs fill at least {100 * MIN_LUNG_FRACTION:.0f}%)"
        )
    return keep


def block_factors(spacing: Sequence[float], grid_mm: float | None) -> list[int]:
    """Voxels per block along each axis for blocks of about `grid_mm` (1 where the voxel is
    already that coarse, or without a grid_mm)."""
    if grid_mm is None:
        return [1, 1, 1]
    return [max(1, round(grid_mm / float(s))) for s in spacing]


def _pool(mask: BoolArray, f: Sequence[int]) -> BoolArray:
    """Each block of f voxels becomes one: set where at least half of the block is set (the
    array is padded with unset voxels to whole blocks)."""
    pad = [(0, -n % k) for n, k in zip(mask.shape, f, strict=True)]
    m = np.pad(mask, pad)
    b = [n // k for n, k in zip(m.shape, f, strict=True)]
    counts = m.reshape(b[0], f[0], b[1], f[1], b[2], f[2]).sum(axis=(1, 3, 5), dtype=np.int32)
    pooled: BoolArray = 2 * counts >= f[0] * f[1] * f[2]
    return pooled


def _unpool(blocks: BoolArray, f: Sequence[int], shape: Sequence[int]) -> BoolArray:
    b = blocks.shape
    full = np.broadcast_to(blocks[:, None, :, None, :, None], (b[0], f[0], b[1], f[1], b[2], f[2]))
    out: BoolArray = full.reshape(b[0] * f[0], b[1] * f[1], b[2] * f[2])[: shape[0], : shape[1], : shape[2]]
    return out


def _close(mask: BoolArray, radius_mm: float, sp: Sequence[float], f: Sequence[int]) -> BoolArray:
    """`mask` closed with an approximate ball of `radius_mm`; with blocks f (block_factors), the
    closing runs on the block grid and the blocks it adds (a dent, a gap between lobes) are added
    to `mask` at full resolution, so the outline elsewhere stays the voxels' own."""
    coarse = _pool(mask, f) if max(f) > 1 else mask
    csp = [s * k for s, k in zip(sp, f, strict=True)]
    steps = _ball_steps(radius_mm, csp)
    pad = [int(np.floor(radius_mm / s)) + 2 for s in csp]
    padded = np.pad(coarse, [(p, p) for p in pad])
    closed = _erode(_dilate(padded, steps), steps)[tuple(slice(p, -p) for p in pad)]
    return mask | _unpool(closed & ~coarse, f, mask.shape) if max(f) > 1 else closed


def lung_region(
    hu: FloatArray,
    body: BoolArray,
    spacing: Sequence[float],
    closing_mm: float = 10.0,
    grid_mm: float | None = None,
) -> BoolArray:
    """Mask of the lung fields (with their contents) inside `body`, same shape as `hu`.

    grid_mm (preprocess.lung_grid_mm): on grids finer than this, the closing and the outline band
    run on blocks of about grid_mm, each set where at least half of its voxels are: their cost
    is that of a 2 mm grid, not of a 0.7 mm one (where they cost 20x more), and the lung outline
    they see is within half a block of the full-resolution one.

    Raises:
        NoRegionError: no air component inside the body looks like a lung (module docstring).
    """
    from scipy import ndimage

    sp = [float(s) for s in spacing]
    air = (hu < LUNG_AIR_HU) & body
    box = bounding_box(air)
    if box is None:
        raise NoRegionError("no air inside the body: no lungs in this scan")
    f = block_factors(sp, grid_mm)
    reach = [int(np.floor(closing_mm / s)) for s in sp]
    band = [int(np.ceil(OUTLINE_MM / s)) for s in sp]
    # the box around the air, padded so that the closing does not erode at the array border and
    # the outside within OUTLINE_MM of the air is in it
    pad = [max(r, w) + 2 for r, w in zip(reach, band, strict=True)]
    lo = [max(a - p, 0) for (a, _), p in zip(box, pad, strict=True)]
    hi = [min(b + p, n) for (_, b), p, n in zip(box, pad, hu.shape, strict=True)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    lab, n = ndimage.label(air[sl], structure=np.ones((3, 3, 3), dtype=bool))
    body_area_cm2 = body.sum(axis=(0, 1), dtype=np.float64) * sp[0] * sp[1] / 100.0
    keep = np.zeros(n + 1, dtype=bool)
    keep[_lung_labels(lab, n, body[sl], body_area_cm2, lo[2], sp, f)] = True
    closed = fill_holes_in_plane(_close(keep[lab], closing_mm, sp, f))
    closed = ndimage.binary_dilation(closed, structure=ndimage.generate_binary_structure(3, 1))
    out = np.zeros(hu.shape, dtype=bool)
    out[sl] = closed & body[sl]
    return out
