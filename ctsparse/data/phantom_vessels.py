"""Pulmonary vessel trees and nodules for the synthetic phantoms.

Vessels are random branching walks grown from each hilum until they taper below a minimum radius
or leave the lung, so every lung holds many small bright structures and a nodule is never the only
bright blob. They are rasterized cheaply: points along each segment carry their tube's
cross-section as mass, are splatted trilinearly into a grid and blurred with a Gaussian matched to
the radius (a few radius classes), which gives tubes with partial-volume edges whatever the voxel
size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ctsparse.data.phantom_anatomy import Anatomy, lung_mask

F64 = npt.NDArray[np.float64]
Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Tubes:
    """Segments p0 -> p1 (N, 3) in the body frame (mm) with radii (N,)."""

    p0: F64
    p1: F64
    r: F64


@dataclass(frozen=True)
class Nodule:
    centre: tuple[float, float, float]  # body frame mm
    diameter: float
    lobes: F64  # (L, 3) unit vectors of lobulations
    lobe_amp: F64  # (L,)
    hu: float
    spicules: Tubes


def _unit(d: F64) -> F64:
    return d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-9)  # type: ignore[no-any-return]


def _inside(an: Anatomy, p: F64) -> npt.NDArray[np.bool_]:
    f = p.astype(np.float32)
    return lung_mask(an, f[:, 0], f[:, 1], f[:, 2])


def _rotate_away(d: F64, angle: F64, rng: np.random.Generator) -> F64:
    """Tilt each unit vector by `angle` radians toward a random perpendicular direction."""
    perp = _unit(np.cross(d, rng.normal(size=d.shape)))
    return _unit(np.cos(angle)[:, None] * d + np.sin(angle)[:, None] * perp)


def grow_vessels(an: Anatomy, rng: np.random.Generator, max_tips: int = 3000) -> Tubes:
    """Branching vessel trees from both hila; the amount varies randomly between patients."""
    step = 3.0
    taper = np.exp(-step / rng.uniform(150.0, 300.0))
    r_min = rng.uniform(0.6, 1.1)
    jitter = rng.uniform(0.1, 0.25)
    starts, dirs, radii, hila = [], [], [], []
    segs: list[tuple[F64, F64, F64]] = []
    _, lv, _, _ = an.lungs
    for side in (1.0, -1.0):
        hil = np.array(
            [an.u_med + side * (an.med_hw + 10.0), lv + rng.uniform(-8, 8), -rng.uniform(10, 35) * an.k]
        )
        for _ in range(8):  # walk laterally until the hilum lies inside this lung
            if _inside(an, hil[None])[0]:
                break
            hil[0] += side * 5.0
        # the pulmonary artery, from the mediastinum to the hilum
        root = hil - np.array([side * 25.0, 0.0, -5.0])
        segs.append((root[None], hil[None], np.array([rng.uniform(6.0, 9.0)])))
        m = int(rng.integers(5, 11))
        d = np.stack([side * rng.uniform(0.2, 1.0, m), rng.uniform(-0.7, 0.7, m), rng.uniform(-1, 1, m)], 1)
        starts.append(np.repeat(hil[None], m, 0))
        dirs.append(_unit(d))
        radii.append(rng.uniform(4.0, 7.0, m))
        hila.append(np.repeat(hil[None], m, 0))
    pos, d, r, home = (np.concatenate(a) for a in (starts, dirs, radii, hila))
    to_branch = rng.uniform(8.0, 25.0, len(r))
    for _ in range(150):
        if len(r) == 0:
            break
        out = _unit(pos - home)
        d = _unit(d + jitter * rng.normal(size=d.shape) + 0.1 * out)
        nxt = pos + step * d
        keep = _inside(an, nxt)
        segs.append((pos[keep], nxt[keep], r[keep]))
        pos, d, r, home, to_branch = nxt[keep], d[keep], r[keep] * taper, home[keep], to_branch[keep] - step
        split = to_branch <= 0
        if split.any() and len(r) < max_tips:
            n = int(split.sum())
            a1, a2 = rng.uniform(0.25, 0.6, n), rng.uniform(0.4, 0.9, n)
            d1, d2 = _rotate_away(d[split], a1, rng), _rotate_away(d[split], a2, rng)
            r1, r2 = r[split] * rng.uniform(0.75, 0.9, n), r[split] * rng.uniform(0.6, 0.85, n)
            pos = np.concatenate([pos[~split], pos[split], pos[split]])
            home = np.concatenate([home[~split], home[split], home[split]])
            d = np.concatenate([d[~split], d1, d2])
            r = np.concatenate([r[~split], r1, r2])
            to_branch = np.concatenate([to_branch[~split], rng.uniform(8.0, 25.0, 2 * n)])
        alive = r >= r_min
        pos, d, r, home, to_branch = pos[alive], d[alive], r[alive], home[alive], to_branch[alive]
    p0, p1, rr = (np.concatenate(a) for a in zip(*segs, strict=True))
    return Tubes(p0, p1, rr)


def draw_nodule(
    an: Anatomy,
    rng: np.random.Generator,
    diameter_mm: tuple[float, float],
    in_fov: Callable[[F64, float], npt.NDArray[np.bool_]],
) -> Nodule:
    """A lobulated, sometimes spiculated, soft-tissue nodule well inside a lung.

    Args:
        in_fov: (body-frame points, margin mm) -> whether each lies that far inside the scanned field.
    """
    vc, ac, bc = an.cavity
    for _ in range(40):
        diameter = rng.uniform(*diameter_mm)
        radius = diameter / 2
        cand = rng.uniform([-ac, vc - bc, an.w_base], [ac, vc + bc, an.w_apex], size=(256, 3))
        cand = cand[in_fov(cand, radius + 8.0) & _inside(an, cand)]
        # the ball plus a 5 mm margin must stay in the lung: test points on its surface
        sphere = _unit(rng.normal(size=(48, 3))) * (radius * 1.3 + 5.0)
        for c in cand:
            if _inside(an, c + sphere).all():
                return _make_nodule(c, diameter, rng)
    raise ValueError("no room for a nodule inside the lungs within the field of view")


def _make_nodule(c: F64, diameter: float, rng: np.random.Generator) -> Nodule:
    n_lobes = int(rng.integers(0, 5))
    n_spic = int(rng.integers(0, 6)) if rng.random() < 0.5 else 0
    sd = _unit(rng.normal(size=(n_spic, 3)))
    length = rng.uniform(3.0, 10.0, n_spic) + diameter / 2
    spic = Tubes(np.repeat(c[None], n_spic, 0), c + sd * length[:, None], rng.uniform(0.5, 1.0, n_spic))
    return Nodule(
        centre=(float(c[0]), float(c[1]), float(c[2])),
        diameter=diameter,
        lobes=_unit(rng.normal(size=(n_lobes, 3))),
        lobe_amp=rng.uniform(0.1, 0.3, n_lobes),
        hu=rng.uniform(20.0, 60.0),
        spicules=spic,
    )


def splat_tubes(hu: Array, points_vox: F64, radii: F64, seg_len: F64, *, spacing: F64, target: float) -> None:
    """Draw tubes into `hu` in place (raising only: a tube never darkens bone).

    Args:
        points_vox: (P, 3) sample points along the tubes in voxel coordinates.
        radii: (P,) tube radius (mm) at each point.
        seg_len: (P,) length (mm) each point stands for.
        spacing: voxel size (mm) per axis.
    """
    from scipy.ndimage import gaussian_filter

    voxel = float(np.prod(spacing))
    # A line of mass pi*r^2 per mm blurred with sigma = 0.6 r has a flat (clipped) top and its
    # half-maximum at ~r once the mass is scaled by 1.35; see the module docstring.
    for lo, hi, rep in ((0.0, 1.5, 1.0), (1.5, 3.0, 2.2), (3.0, 6.0, 4.5), (6.0, np.inf, 8.0)):
        sel = (radii >= lo) & (radii < hi)
        if not sel.any():
            continue
        pts, mass = points_vox[sel], 1.35 * np.pi * radii[sel] ** 2 * seg_len[sel] / voxel
        sigma = np.maximum(0.6 * rep / spacing, 0.5)
        margin = np.ceil(3 * sigma).astype(int) + 2
        lo_i = np.maximum(np.floor(pts.min(0)).astype(int) - margin, 0)
        hi_i = np.minimum(np.ceil(pts.max(0)).astype(int) + margin + 1, hu.shape)
        if np.any(hi_i <= lo_i):
            continue
        size = tuple(int(s) for s in hi_i - lo_i)
        local = pts - lo_i
        base = np.floor(local).astype(int)
        frac = local - base
        grid = np.zeros(int(np.prod(size)), dtype=np.float64)
        for corner in np.ndindex(2, 2, 2):
            idx = base + corner
            wgt = mass * np.prod(np.where(corner, frac, 1 - frac), axis=1)
            ok = np.all((idx >= 0) & (idx < size), axis=1)
            flat = np.ravel_multi_index(tuple(idx[ok].T), size)
            grid += np.bincount(flat, weights=wgt[ok], minlength=grid.size)
        field = gaussian_filter(grid.reshape(size).astype(np.float32), sigma, truncate=3.0)
        np.clip(field, 0.0, 1.0, out=field)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i, strict=True))
        sub = hu[box]
        np.maximum(sub, sub + (target - sub) * field, out=sub)


def sample_tubes(t: Tubes, step_mm: float) -> tuple[F64, F64, F64]:
    """Points every ~step_mm along the segments, with their radius and the length they stand for."""
    length = np.linalg.norm(t.p1 - t.p0, axis=1)
    n = np.maximum(np.ceil(length / step_mm).astype(int), 1)
    seg = np.repeat(np.arange(len(n)), n)
    k = np.arange(len(seg)) - np.repeat(np.cumsum(n) - n, n)
    frac = (k + 0.5) / n[seg]
    pts = t.p0[seg] + frac[:, None] * (t.p1 - t.p0)[seg]
    return pts, t.r[seg], (length / n)[seg]


def nodule_occupancy(nod: Nodule, u: Array, v: Array, w: Array, voxel_mm: float) -> Array:
    """Fraction of each voxel inside the nodule (a one-voxel linear ramp for partial volume)."""
    du, dv, dw = u - nod.centre[0], v - nod.centre[1], w - nod.centre[2]
    dist = np.sqrt(du**2 + dv**2 + dw**2) + 1e-6
    radius = np.full(dist.shape, nod.diameter / 2, dtype=np.float32)
    for lobe, amp in zip(nod.lobes, nod.lobe_amp, strict=True):
        cos = (du * lobe[0] + dv * lobe[1] + dw * lobe[2]) / dist
        radius *= 1.0 + amp * np.maximum(cos, 0.0) ** 4 - amp / 5
    return np.clip((radius - dist) / voxel_mm + 0.5, 0.0, 1.0).astype(np.float32)  # type: ignore[no-any-return]
