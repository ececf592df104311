"""Rasterize one slab of a phantom's anatomy: HU values of each tissue, drawn back to front.

Later tissues overwrite earlier ones: air, table, skin, fat, muscle, ribs, cavity fill, spine,
heart, aorta, airways, lungs. Vessels and the nodule are added afterwards (phantom_vessels).
"""

from __future__ import annotations

import numpy as np

from ctsparse.data.phantom_anatomy import (
    Anatomy,
    Array,
    dome,
    ell,
    heart_mask,
    lung_mask,
    segments_mask,
)


def render_slab(an: Anatomy, u: Array, v: Array, w: Array, *, x: Array, y: Array) -> Array:
    """HU of one slab. u, v: (X, Y, 1) body frame; w: (1, 1, Z); x, y: world (X, Y, 1)."""
    shape = np.broadcast_shapes(u.shape, w.shape)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    # table: a plate in the world frame, curved up at the sides, separated from the body by air
    lowest = _body_lowest(an)
    top = lowest - an.table_gap + an.table_curv * (x - an.cx) ** 2
    table = (y <= top) & (y > top - an.table_thick) & (np.abs(x - an.cx) < 230.0)
    np.copyto(hu, np.float32(an.hu_table), where=table)
    body_r2 = ell(u, v, an.body_a, an.body_b)
    np.copyto(hu, np.float32(an.hu_skin), where=body_r2 < 1.0)
    np.copyto(hu, np.float32(an.hu_fat), where=ell(u, v, *an.fat_ab) < 1.0)
    am, bm = an.muscle_ab
    np.copyto(hu, np.float32(an.hu_muscle), where=ell(u, v, am, bm) < 1.0)
    vc, ac, bc = an.cavity
    cav_r2 = ell(u, v, ac, bc, vc=vc)
    # ribs: oblique bands in a ring just outside the cavity, lower anteriorly than posteriorly
    phi_s = np.clip((v - vc) / bc, -1.0, 1.0) / np.sqrt(np.maximum(cav_r2, 1e-6))
    ring = (cav_r2 >= 1.0) & (cav_r2 < (1.0 + an.rib_depth / min(ac, bc)) ** 2)
    ring &= (np.abs(u) > 18.0) & ~((v < vc) & (np.abs(u - an.u_med) < an.vb_r + 12.0))
    phase = np.mod(w + an.rib_slope * phi_s - an.rib_phase, an.rib_pitch)
    ribs = ring & (phase < an.rib_height) & (w < an.w_apex + 10.0) & (w > an.w_base - 30.0)
    np.copyto(hu, np.float32(an.hu_bone), where=ribs)
    # sternum
    sternum = (np.abs(u - an.u_med) < 14.0) & (v > vc + bc - 1.0) & (v < vc + bc + 11.0)
    np.copyto(
        hu,
        np.float32(an.hu_marrow + 100.0),
        where=sternum & (w < an.w_apex - 10.0) & (w > an.heart[2] - 30.0),
    )
    # cavity: mediastinal fill above the diaphragm, liver / stomach below
    cavity = cav_r2 < 1.0
    below = w < dome(an, u, v)
    np.copyto(hu, np.float32(an.hu_med), where=cavity & ~below)
    np.copyto(hu, np.float32(an.hu_liver), where=cavity & below & (u - an.u_med > -0.25 * ac))
    np.copyto(hu, np.float32(an.hu_muscle - 10.0), where=cavity & below & (u - an.u_med <= -0.25 * ac))
    if an.bubble > 0:
        bub = (
            (u - an.u_med + 0.5 * ac) ** 2
            + (v - vc - 0.2 * bc) ** 2
            + (w - an.w_base - an.dome_l + an.bubble + 15.0) ** 2
        )
        # gastric air above the fluid level
        fluid = w < an.w_base + an.dome_l - 15.0 - 1.3 * an.bubble
        np.copyto(hu, np.float32(-1000.0), where=cavity & below & (bub < an.bubble**2) & ~fluid)
    _spine(an, hu, u, v, w)
    # heart in its fat, aorta, trachea and main bronchi
    np.copyto(hu, np.float32(an.hu_fat + 20.0), where=heart_mask(an, u, v, w, 4.0) & ~below)
    np.copyto(hu, np.float32(an.hu_muscle), where=heart_mask(an, u, v, w, 0.0) & ~below)
    np.copyto(hu, np.float32(an.hu_blood), where=heart_mask(an, u, v, w, -7.0) & ~below)
    np.copyto(hu, np.float32(an.hu_blood), where=segments_mask(u, v, w, segs=an.aorta_segments(), r=an.ao_r))
    trachea = ((u - an.u_med) ** 2 + (v - an.trachea_v) ** 2 < an.tr_r**2) & (w > 0.0) & (body_r2 < 0.9)
    np.copyto(hu, np.float32(-1000.0), where=trachea)
    np.copyto(hu, np.float32(-1000.0), where=segments_mask(u, v, w, segs=an.bronchi(), r=0.7 * an.tr_r))
    lungs = lung_mask(an, u, v, w)
    lung_hu = an.hu_lung + an.lung_grad * np.clip((vc - v) / bc, -1.0, 1.0)
    np.copyto(hu, lung_hu.astype(np.float32), where=lungs)
    return hu


def _spine(an: Anatomy, hu: Array, u: Array, v: Array, w: Array) -> None:
    um = u - an.u_med
    r2 = um**2 + (v - an.v_vb) ** 2
    disc = np.mod(w - an.vb_phase, an.vb_pitch) < 0.2 * an.vb_pitch
    np.copyto(hu, np.float32(an.hu_bone), where=r2 < an.vb_r**2)
    np.copyto(hu, np.float32(an.hu_marrow), where=(r2 < (an.vb_r - 2.5) ** 2) & ~disc)
    np.copyto(hu, np.float32(80.0), where=(r2 < an.vb_r**2) & disc)
    canal_v = an.v_vb - an.vb_r - 8.0
    c2 = um**2 + (v - canal_v) ** 2
    arch = (c2 < 14.0**2) & (v < canal_v + 3.0)
    transverse = (np.abs(um) < 28.0) & (np.abs(v - canal_v) < 4.0)
    spinous = (np.abs(um) < 4.0) & (v < canal_v) & (v > -(an.muscle_ab[1] - 8.0))
    np.copyto(hu, np.float32(an.hu_marrow + 150.0), where=arch | transverse | spinous)
    np.copyto(hu, np.float32(20.0), where=c2 < 8.0**2)  # cord and CSF


def _body_lowest(an: Anatomy) -> float:
    """Lowest world y of the rotated skin ellipse (the table lies below it)."""
    t = np.linspace(0.0, 2.0 * np.pi, 721)
    bu, bv = an.body_a * np.cos(t), an.body_b * np.sin(t)
    y = an.cy + np.sin(an.theta) * bu + np.cos(an.theta) * bv
    x = an.cx + np.cos(an.theta) * bu - np.sin(an.theta) * bv
    # the curved table must clear the whole outline, not only its lowest point
    return float(np.min(y - an.table_curv * (x - an.cx) ** 2))
