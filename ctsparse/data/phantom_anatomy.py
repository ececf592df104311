"""Chest anatomy of the synthetic phantoms: random shape parameters, then a deterministic rasterizer.

Everything is drawn in the body frame, in mm: u toward the patient's right, v anterior, w superior,
with u = v = 0 on the body axis and w = 0 at the carina. The world (RAS+) frame is the body frame
rotated by ``theta`` about z and shifted by (cx, cy, z0). Organs are ellipses, ellipsoids and tubes
with CT-like HU values; the same analytic ``lung_mask`` is used by the rasterizer (phantom_render), by
the vessel trees (which must stay inside the lungs) and by the nodule placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

# float32 on grids, float64 for point lists: the helpers broadcast over either
Array = npt.NDArray[Any]
Mask = npt.NDArray[np.bool_]
Point = tuple[float, float, float]
Seg = tuple[Point, Point]


@dataclass(frozen=True)
class Anatomy:
    """Random shape and HU parameters of one patient (drawn by ``draw_anatomy``)."""

    cx: float  # body axis in world mm
    cy: float
    z0: float  # world z of the carina
    theta: float  # rotation about z, radians
    k: float  # craniocaudal size factor
    body_a: float  # skin ellipse semi-axes (lateral, AP)
    body_b: float
    skin: float
    fat: float
    muscle: float
    back: float  # extra posterior muscle (paraspinal)
    med_hw: float  # half width of the upper mediastinum
    u_med: float
    vb_r: float  # vertebral body radius
    vb_pitch: float
    vb_phase: float
    rib_pitch: float
    rib_phase: float
    rib_slope: float
    rib_height: float
    rib_depth: float
    tr_r: float  # trachea radius
    ao_r: float  # aorta radius
    w_arch: float
    heart: tuple[float, float, float, float, float, float]  # centre u, v, w; semi-axes
    w_apex: float
    w_base: float  # lowest lung point (costophrenic recess)
    dome_r: float  # height of the right / left diaphragm domes above w_base
    dome_l: float
    table_gap: float
    table_thick: float
    table_curv: float
    bubble: float  # radius of a gastric air bubble, 0 for none
    hu_skin: float
    hu_fat: float
    hu_muscle: float
    hu_med: float  # mediastinal fill (fat content varies between patients)
    hu_blood: float  # ~40, or ~200 with contrast
    hu_liver: float
    hu_bone: float  # cortical rim
    hu_marrow: float
    hu_lung: float
    lung_grad: float  # dependent (posterior) lung is denser
    hu_table: float

    # Derived ellipses: the fat ellipse is the skin ellipse minus the skin; the thoracic cavity
    # (inside the muscles and ribs) is shifted anteriorly because the back muscles are thicker.
    @property
    def fat_ab(self) -> tuple[float, float]:
        return self.body_a - self.skin, self.body_b - self.skin

    @property
    def muscle_ab(self) -> tuple[float, float]:
        return self.body_a - self.skin - self.fat, self.body_b - self.skin - self.fat

    @property
    def cavity(self) -> tuple[float, float, float]:
        """(v centre, semi-axis a, semi-axis b) of the thoracic cavity."""
        am, bm = self.muscle_ab
        return self.back / 2, am - self.muscle, bm - self.muscle - self.back / 2

    @property
    def v_vb(self) -> float:
        vc, _, bc = self.cavity
        return vc - bc + 0.7 * self.vb_r

    @property
    def trachea_v(self) -> float:
        return self.v_vb + self.vb_r + 8.0 + self.tr_r

    @property
    def lungs(self) -> tuple[float, float, float, float]:
        """(|u| offset of each lung centre from u_med, v centre, semi-axes a, b) of the lung ellipses."""
        vc, ac, bc = self.cavity
        return (self.med_hw + ac) / 2, vc - 0.05 * bc, (ac - self.med_hw) / 2 + 12.0, bc

    def aorta_segments(self) -> list[Seg]:
        _, hv, hw, _, hb, hc = self.heart
        asc = (self.u_med + 12.0, hv + 0.35 * hb)
        desc = (self.u_med - self.vb_r - 0.6 * self.ao_r, self.v_vb + 0.4 * self.vb_r)
        return [
            ((asc[0], asc[1], hw + 0.4 * hc), (asc[0], asc[1], self.w_arch)),
            ((asc[0], asc[1], self.w_arch), (desc[0], desc[1], self.w_arch)),
            ((desc[0], desc[1], self.w_arch), (desc[0], desc[1], -1e4)),
        ]

    def bronchi(self) -> list[Seg]:
        tv = self.trachea_v
        return [
            ((self.u_med, tv, 0.0), (self.u_med + s * (self.med_hw + 8.0), tv - 6.0, -25.0 * self.k))
            for s in (1.0, -1.0)
        ]


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient: size, fat, organ positions, HU calibration, table, pose."""
    u = rng.uniform
    a = u(130.0, 172.0)
    b = a * u(0.64, 0.8)
    k = u(0.88, 1.12)
    contrast = bool(rng.random() < 0.4)
    cav_a = a - 2.5 - 0.09 * b - 12.0  # approximate, for the heart size
    an = Anatomy(
        cx=u(-20.0, 20.0),
        cy=u(-10.0, 25.0),
        z0=u(15.0, 50.0),
        theta=float(np.deg2rad(u(-6.0, 6.0))),
        k=k,
        body_a=a,
        body_b=b,
        skin=u(2.0, 3.0),
        fat=b * u(0.03, 0.16),
        muscle=u(8.0, 15.0),
        back=b * u(0.18, 0.3),
        med_hw=u(17.0, 27.0),
        u_med=u(-8.0, 0.0),
        vb_r=u(14.0, 18.0) * a / 150.0,
        vb_pitch=u(24.0, 30.0) * k,
        vb_phase=u(0.0, 30.0),
        rib_pitch=u(24.0, 30.0) * k,
        rib_phase=u(0.0, 30.0),
        rib_slope=u(25.0, 45.0),
        rib_height=u(8.0, 12.0),
        rib_depth=u(6.0, 9.0),
        tr_r=u(8.0, 11.0),
        ao_r=u(11.0, 15.0),
        w_arch=u(20.0, 35.0) * k,
        heart=(
            -u(0.1, 0.2) * cav_a,
            0.0,  # replaced below (needs the cavity)
            -u(55.0, 75.0) * k,
            u(0.38, 0.48) * cav_a,
            u(0.45, 0.55),
            u(50.0, 62.0) * k,
        ),
        w_apex=u(105.0, 130.0) * k,
        w_base=-u(150.0, 175.0) * k,
        dome_r=u(60.0, 80.0) * k,
        dome_l=u(45.0, 65.0) * k,
        table_gap=u(6.0, 20.0),
        table_thick=u(8.0, 18.0),
        table_curv=u(0.0, 1.0 / 1500.0),
        bubble=u(15.0, 35.0) if rng.random() < 0.5 else 0.0,
        hu_skin=u(30.0, 60.0),
        hu_fat=u(-115.0, -85.0),
        hu_muscle=u(40.0, 60.0),
        hu_med=u(-40.0, 40.0),
        hu_blood=u(150.0, 250.0) if contrast else u(30.0, 50.0),
        hu_liver=u(45.0, 70.0),
        hu_bone=u(600.0, 900.0),
        hu_marrow=u(150.0, 300.0),
        hu_lung=u(-880.0, -800.0),
        lung_grad=u(20.0, 70.0),
        hu_table=u(-100.0, 300.0),
    )
    # the heart's AP position and size are relative to the cavity, known only now
    vc, _, bc = an.cavity
    hu_, _, hw, ha, hb_frac, hc = an.heart
    hb = hb_frac * bc
    return replace(an, heart=(hu_ + an.u_med, vc + bc - hb - 4.0, hw, ha, hb, hc))


def ell(u: Array, v: Array, a: float, b: float, *, uc: float = 0.0, vc: float = 0.0) -> Array:
    """Squared normalized radius of an ellipse: < 1 inside."""
    return ((u - uc) / a) ** 2 + ((v - vc) / b) ** 2


def seg_dist(u: Array, v: Array, w: Array, p0: Point, p1: Point) -> Array:
    """Distance (mm) from points to the segment p0-p1 (broadcasting)."""
    d = np.subtract(p1, p0)
    du, dv, dw = u - p0[0], v - p0[1], w - p0[2]
    t = np.clip((du * d[0] + dv * d[1] + dw * d[2]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.sqrt((du - t * d[0]) ** 2 + (dv - t * d[1]) ** 2 + (dw - t * d[2]) ** 2)  # type: ignore[no-any-return]


def segments_mask(u: Array, v: Array, w: Array, *, segs: Sequence[Seg], r: float) -> Mask:
    """True within r mm of any of the segments."""
    out = np.zeros(np.broadcast_shapes(u.shape, v.shape, w.shape), dtype=bool)
    wmin, wmax = float(np.min(w)), float(np.max(w))
    for p0, p1 in segs:
        if min(p0[2], p1[2]) - r > wmax or max(p0[2], p1[2]) + r < wmin:
            continue  # skip the expensive distance for slabs the segment does not reach
        out |= seg_dist(u, v, w, p0, p1) < r
    return out


def dome(an: Anatomy, u: Array, v: Array) -> Array:
    """w of the diaphragm surface: the right dome is higher (the liver lies under it)."""
    lu, lv, la, lb = an.lungs
    right = u > an.u_med
    du = np.where(right, u - an.u_med - lu, u - an.u_med + lu)
    rho2 = np.clip((du / la) ** 2 + ((v - lv) / lb) ** 2, 0.0, 1.0)
    return an.w_base + np.where(right, an.dome_r, an.dome_l) * (1.0 - rho2)


def heart_mask(an: Anatomy, u: Array, v: Array, w: Array, grow: float = 0.0) -> Mask:
    """Inside the heart ellipsoid grown by `grow` mm (negative: the chambers inside the wall)."""
    hu_, hv, hw, ha, hb, hc = an.heart
    r2 = ((u - hu_) / (ha + grow)) ** 2 + ((v - hv) / (hb + grow)) ** 2 + ((w - hw) / (hc + grow)) ** 2
    return r2 < 1.0


def med_halfwidth(an: Anatomy, v: Array) -> Array:
    """The mediastinum is widest mid-way between sternum and spine; the lungs nearly meet in front."""
    vc, _, bc = an.cavity
    return an.med_hw * (0.45 + 0.75 * np.maximum(1.0 - ((v - vc) / (0.85 * bc)) ** 2, 0.0))


def lung_mask(an: Anatomy, u: Array, v: Array, w: Array) -> Mask:
    """True inside either lung (broadcasting over u, v, w in the body frame)."""
    vc, ac, bc = an.cavity
    lu, lv, la, lb = an.lungs
    # apex: the lung ellipse shrinks to nothing over the top 70*k mm
    top = an.w_apex - 70.0 * an.k
    s2 = np.clip(1.0 - ((np.maximum(w, top) - top) / (an.w_apex - top)) ** 2, 0.0, 1.0)
    du = np.abs(u - an.u_med) - lu
    inside = (du**2 / la**2 + (v - lv) ** 2 / lb**2 < s2) & (ell(u, v, ac - 1.5, bc - 1.5, vc=vc) < 1.0)
    inside &= (np.abs(u - an.u_med) > med_halfwidth(an, v)) & (w > dome(an, u, v))
    inside &= ~heart_mask(an, u, v, w, 5.0)
    inside &= (u - an.u_med) ** 2 + (v - an.v_vb) ** 2 > (an.vb_r + 8.0) ** 2
    inside &= ~segments_mask(u, v, w, segs=an.aorta_segments(), r=an.ao_r + 3.0)
    return inside
