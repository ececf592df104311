"""Synthetic chest CT phantoms with two classes, ``normal`` and ``nodule``, written as NIfTI or DICOM.

Each phantom is a random patient (size, fat, organ positions, HU calibration, vessel trees, noise,
pose on the table, field of view) drawn from its own seed; the ``nodule`` class adds one 6-20 mm
soft-tissue nodule inside a lung. Patient, vessels and noise are drawn from separate child
generators, so the same generator gives the same patient for both labels, and the label cannot be
read from global statistics (kept-voxel count, HU histogram): the nodule is a few hundred mm³
against natural variations of litres.

>>> vol = make_phantom("nodule", np.random.default_rng(0))
>>> vol.array.shape, vol.meta["label"]
((96, 96, 64), 'nodule')
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from ctsparse.data.phantom_anatomy import Anatomy, draw_anatomy
from ctsparse.data.phantom_render import render_slab
from ctsparse.data.phantom_vessels import (
    Nodule,
    draw_nodule,
    grow_vessels,
    nodule_occupancy,
    sample_tubes,
    splat_tubes,
)
from ctsparse.errors import DatasetError
from ctsparse.volume import Volume

F64 = npt.NDArray[np.float64]

CLASSES = ("normal", "nodule")
# 350 mm is a typical adult chest display field; 320 mm covers the lungs from apex to bases.
FOV_MM = (350.0, 350.0, 320.0)
# `ctsparse phantoms` (generate_phantoms): at 2.5 mm a 6 mm nodule spans two to three voxels along
# every axis; at 3.65 x 3.65 x 5 mm it covers under two, and the smallest nodules cannot be
# told from vessels (docs/benchmarks.md, "Out of the box")
DEFAULT_SPACING = (2.5, 2.5, 2.5)
# one phantom (make_phantom): 96 x 96 x 64, small enough for benchmarks and tests
SINGLE_SPACING = (3.65, 3.65, 5.0)
SLAB = 16  # slices rendered at once: bounds the temporaries of a 512 x 512 x 300 phantom
FINDING_COLUMNS = ("path", "finding", "x_mm", "y_mm", "z_mm", "radius_mm")


def default_shape(spacing: Sequence[float]) -> tuple[int, int, int]:
    """Grid that covers FOV_MM at `spacing`."""
    x, y, z = (max(round(f / s), 8) for f, s in zip(FOV_MM, spacing, strict=True))
    return x, y, z


def _to_world(an: Anatomy, p: F64) -> F64:
    c, s = np.cos(an.theta), np.sin(an.theta)
    return np.stack(
        [an.cx + c * p[:, 0] - s * p[:, 1], an.cy + s * p[:, 0] + c * p[:, 1], an.z0 + p[:, 2]], 1
    )


def make_phantom(
    label: str,
    rng: np.random.Generator,
    *,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] = SINGLE_SPACING,
    vary_geometry: bool = False,
    nodule_mm: tuple[float, float] = (6.0, 20.0),
    source: str = "phantom",
) -> Volume:
    """One synthetic chest CT in HU, closest-canonical RAS+ axes, centred on the world origin.

    Args:
        label: "normal" or "nodule".
        shape: voxels (X, Y, Z); None covers FOV_MM at `spacing`.
        vary_geometry: draw the in-plane pixel size (±10 %, i.e. the field of view) and the slice
            count (-20 %..+10 %) at random, as scanners and protocols do.
        nodule_mm: range of the nodule diameter.
    """
    from scipy.ndimage import gaussian_filter

    if label not in CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; known: {', '.join(CLASSES)}")
    g_geo, g_anat, g_vessel, g_nod, g_noise = rng.spawn(5)
    sp = np.asarray(spacing, dtype=np.float64)
    dims = np.asarray(shape if shape is not None else default_shape(spacing), dtype=np.int64)
    if vary_geometry:
        sp[:2] *= g_geo.uniform(0.9, 1.1)
        dims[2] = max(round(dims[2] * g_geo.uniform(0.8, 1.1)), 4)
    nx, ny, nz = (int(d) for d in dims)
    an = draw_anatomy(g_anat)
    if vary_geometry:
        # a smaller field of view must still hold the lungs: a scanner's display field is chosen
        # to cover the chest, and lungs cut by the image edge would open onto the outside air
        need = _cavity_half_extent(an) + 10.0
        sp[:2] = max(float(sp[0]), float(np.max(need / ((dims[:2] - 1) / 2))))
    origin = -(dims - 1) / 2 * sp
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = origin
    # at least two voxels of air between body and table, so the body mask can drop the table
    an = replace(an, table_gap=max(an.table_gap, 2.0 * float(sp[1])))
    x = (origin[0] + np.arange(nx) * sp[0]).astype(np.float32)[:, None, None]
    y = (origin[1] + np.arange(ny) * sp[1]).astype(np.float32)[None, :, None]
    u, v = _body_uv(an, x, y)
    hu = np.empty((nx, ny, nz), dtype=np.float32)
    for k0 in range(0, nz, SLAB):
        k1 = min(k0 + SLAB, nz)
        w = (origin[2] + np.arange(k0, k1) * sp[2] - an.z0).astype(np.float32)[None, None, :]
        hu[:, :, k0:k1] = render_slab(an, u, v, w, x=x, y=y)

    def to_vox(p: F64) -> F64:
        return (_to_world(an, p) - origin) / sp

    pts, rad, seg_len = sample_tubes(grow_vessels(an, g_vessel), 0.5 * float(sp.min()))
    splat_tubes(hu, to_vox(pts), rad, seg_len, spacing=sp, target=an.hu_blood)

    def in_fov(p: F64, margin: float) -> npt.NDArray[np.bool_]:
        wp = _to_world(an, p)
        return np.all((wp >= origin + margin) & (wp <= origin + (dims - 1) * sp - margin), axis=1)  # type: ignore[no-any-return]

    meta: dict[str, object] = {"format": "phantom", "label": label}
    # drawn for both labels so that one generator gives the same patient with and without it
    nod = draw_nodule(an, g_nod, nodule_mm, in_fov)
    if label == "nodule":
        centre = np.array([nod.centre])
        cv = to_vox(centre)[0]
        _draw_nodule(hu, an, nod, cv, origin=origin, sp=sp)
        sp_pts, sp_r, sp_len = sample_tubes(nod.spicules, 0.5 * float(sp.min()))
        if len(sp_pts):
            splat_tubes(hu, to_vox(sp_pts), sp_r, sp_len, spacing=sp, target=nod.hu)
        meta |= {
            "nodule_center_mm": [round(float(a), 2) for a in _to_world(an, centre)[0]],
            "nodule_center_voxel": [round(float(a), 2) for a in cv],
            "nodule_diameter_mm": round(float(nod.diameter), 2),
        }

    # partial-volume blur of the reconstruction kernel, then quantum noise (in place: 512^3 is big)
    gaussian_filter(hu, 0.7, output=hu, truncate=3.0)
    noise_sd = float(g_noise.uniform(10.0, 20.0))
    for k0 in range(0, nz, SLAB):
        k1 = min(k0 + SLAB, nz)
        hu[:, :, k0:k1] += g_noise.standard_normal((nx, ny, k1 - k0), dtype=np.float32) * np.float32(noise_sd)
    # integer HU in the 12-bit range, as scanners store them
    np.rint(np.clip(hu, -1024.0, 3071.0, out=hu), out=hu)
    meta |= {"noise_sd": round(noise_sd, 2), "contrast": bool(an.hu_blood > 100.0)}
    return Volume(array=hu, affine=affine, source=source, meta=meta)


def _cavity_half_extent(an: Anatomy) -> F64:
    """|x| and |y| (world mm) up to which the thoracic cavity reaches, measured from the origin."""
    vc, ac, bc = an.cavity
    c, s = np.cos(an.theta), np.sin(an.theta)
    centre = np.array([an.cx - s * vc, an.cy + c * vc])
    half = np.array([np.hypot(ac * c, bc * s), np.hypot(ac * s, bc * c)])
    out: F64 = np.abs(centre) + half
    return out


def _body_uv(
    an: Anatomy, x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """World x, y (broadcastable) -> body-frame u, v."""
    c, s = np.float32(np.cos(an.theta)), np.float32(np.sin(an.theta))
    return c * (x - an.cx) + s * (y - an.cy), -s * (x - an.cx) + c * (y - an.cy)


def _draw_nodule(
    hu: npt.NDArray[np.float32], an: Anatomy, nod: Nodule, cv: F64, *, origin: F64, sp: F64
) -> None:
    """Blend the nodule into `hu` in place, within a box around its centre voxel `cv`."""
    half = np.ceil((nod.diameter * 0.75 + 2.0) / sp).astype(int) + 1
    lo = np.maximum(np.round(cv).astype(int) - half, 0)
    hi = np.minimum(np.round(cv).astype(int) + half + 1, hu.shape)
    gx, gy, gz = ((origin[i] + np.arange(lo[i], hi[i]) * sp[i]).astype(np.float32) for i in range(3))
    bu, bv = _body_uv(an, gx[:, None, None], gy[None, :, None])
    occ = nodule_occupancy(nod, bu, bv, (gz - an.z0)[None, None, :], float(np.cbrt(np.prod(sp))))
    sub = hu[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))]
    np.maximum(sub, sub + (np.float32(nod.hu) - sub) * occ, out=sub)


def phantom_labels(
    n: int, seed: int, classes: Sequence[str] = CLASSES, balanced: bool = True, first_index: int = 0
) -> list[str]:
    """Labels of cases first_index .. first_index+n-1; a case's label does not depend on n.

    Balanced: every block of len(classes) consecutive cases holds each class once, in random order.
    """
    k = len(classes)
    out = []
    for i in range(first_index, first_index + n):
        if balanced:
            perm = np.random.default_rng([seed, 0x1ABE1, i // k]).permutation(k)
            out.append(classes[int(perm[i % k])])
        else:
            out.append(classes[int(np.random.default_rng([seed, 0x1ABE1, i]).integers(k))])
    return out


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case `index`: the same whatever the number of cases generated."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def generate_phantoms(
    out_dir: str | Path,
    n: int,
    seed: int,
    fmt: Literal["nifti", "dicom"] = "nifti",
    *,
    classes: Sequence[str] = CLASSES,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] = DEFAULT_SPACING,
    balanced: bool = True,
    vary_geometry: bool = True,
    nodule_mm: tuple[float, float] = (6.0, 20.0),
    first_index: int = 0,
    workers: int = 1,
) -> list[Path]:
    """Write n phantoms, `labels.csv` (path,label; paths relative to out_dir) and `findings.csv`
    into out_dir.

    NIfTI cases are ``case_0000.nii.gz``; DICOM cases are series folders ``case_0000/``.
    findings.csv has one row per finding (normal cases have none): path, finding (``nodule``), its
    centre in RAS+ mm in the written scan's world frame (the frame of the NIfTI affine, and of
    the DICOM series read back) and its nominal radius in mm (the surface of a lobulated nodule
    lies within about -20..+25 % of it).

    Returns:
        The written scan paths (files or folders), in case order.
    """
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or not classes:
        raise DatasetError(out_dir, f"unknown phantom classes {unknown}; known: {', '.join(CLASSES)}")
    if fmt not in ("nifti", "dicom"):
        raise DatasetError(out_dir, f"unknown format {fmt!r}; use nifti or dicom")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = phantom_labels(n, seed, classes, balanced, first_index)
    jobs = [
        (label, seed, i, out / f"case_{i:04d}", fmt, shape, spacing, vary_geometry, nodule_mm)
        for i, label in zip(range(first_index, first_index + n), labels, strict=True)
    ]
    if workers > 1 and n > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: children must not inherit the parent's thread pools; each case is self-seeded, so
        # the files are the same whatever the number of workers
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, n), mp_context=ctx) as pool:
            cases = list(pool.map(_write_case, *zip(*jobs, strict=True)))
    else:
        cases = [_write_case(*job) for job in jobs]
    written = [path for path, _ in cases]
    with open(out / "labels.csv", "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["path", "label"])
        for path, label in zip(written, labels, strict=True):
            rows.writerow([path.relative_to(out).as_posix(), label])
    with open(out / "findings.csv", "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(FINDING_COLUMNS)
        for path, meta in cases:
            if "nodule_center_mm" in meta:
                x, y, z = meta["nodule_center_mm"]
                radius = round(float(meta["nodule_diameter_mm"]) / 2, 3)
                rows.writerow([path.relative_to(out).as_posix(), "nodule", x, y, z, radius])
    return written


def _write_case(
    label: str,
    seed: int,
    index: int,
    stem: Path,
    fmt: Literal["nifti", "dicom"],
    shape: Sequence[int] | None,
    spacing: Sequence[float],
    vary_geometry: bool,
    nodule_mm: tuple[float, float],
) -> tuple[Path, dict[str, Any]]:
    vol = make_phantom(
        label,
        case_rng(seed, index),
        shape=shape,
        spacing=spacing,
        vary_geometry=vary_geometry,
        nodule_mm=nodule_mm,
        source=f"phantom:{seed}/{index}",
    )
    return write_phantom(vol, stem, fmt), vol.meta


def write_phantom(vol: Volume, stem: Path, fmt: Literal["nifti", "dicom"]) -> Path:
    """Write to ``stem.nii.gz`` or the series folder ``stem/``; returns that path."""
    from ctsparse.io.write import write_dicom_series, write_nifti

    if fmt == "nifti":
        path = stem.with_name(stem.name + ".nii.gz")
        write_nifti(vol, path)
        return path
    from pydicom.uid import generate_uid

    if stem.exists() and any(stem.iterdir()):
        raise DatasetError(stem, "series folder already exists and is not empty; use an empty output folder")
    # UIDs derived from the case's source, so that regenerating writes the same series
    write_dicom_series(
        vol,
        stem,
        series_uid=generate_uid(entropy_srcs=[vol.source, "series"]),
        study_uid=generate_uid(entropy_srcs=[vol.source, "study"]),
        FrameOfReferenceUID=generate_uid(entropy_srcs=[vol.source, "frame"]),
        SeriesDescription=f"ctsparse phantom {vol.source}",
    )
    return stem
