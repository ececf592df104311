"""Sparse augmentations on coordinates and values.

As in TorchIO, randomness is kept apart from application: `make_params` draws the values with a
Generator, `apply` is deterministic. This makes an augmented sample reproducible from its params.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.config import AugmentConfig
from ctsparse.sparse_volume import SparseVolume


@dataclass(frozen=True)
class AugmentParams:
    flip_lr: bool
    angle_rad: float  # rotation about the superior axis (patients lie rotated on the table)
    scale: float
    hu_shift: float  # in HU, added to every voxel (scanner calibration offsets)


def make_params(cfg: AugmentConfig, rng: np.random.Generator) -> AugmentParams:
    return AugmentParams(
        flip_lr=bool(cfg.flip and rng.random() < 0.5),
        angle_rad=float(np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))),
        scale=float(rng.uniform(cfg.scale[0], cfg.scale[1])),
        hu_shift=float(rng.normal(0.0, cfg.hu_jitter)) if cfg.hu_jitter > 0 else 0.0,
    )


def _patch_size(sv: SparseVolume) -> int:
    return int(sv.params.get("patch_size", 1)) if sv.params.get("features") == "patch" else 1


def apply(sv: SparseVolume, p: AugmentParams) -> SparseVolume:
    """Flip / rotate / scale the site coordinates (and the findings' centres), shift the HU
    features.

    Rotation and scaling resample the sites by nearest neighbour, as a dense image is resampled:
    every grid cell near the moved sites is mapped back into the scan, and it becomes a site when
    the cell it lands in is one. Rounding the moved sites forward instead would leave holes where
    the grid is stretched or turned (a vessel turned into a dotted line, a pit in a nodule) and
    merge sites where it is squeezed: shapes that no scan has at predict. For patch features a
    flip also mirrors the k^3 values inside each block; rotations move whole blocks only, an
    approximation that is good for the small angles used here.
    """
    coords = sv.coords.astype(np.float64)
    feats = sv.feats
    k = _patch_size(sv)
    centre = (np.asarray(sv.grid_shape, dtype=np.float64) - 1) / 2
    # channels after the k^3 HU values (the blob filter) are rotation- and flip-invariant scalars
    n_hu = k**3
    marks = None if sv.marks is None else sv.marks.copy()
    if p.flip_lr:
        coords[:, 0] = 2 * centre[0] - coords[:, 0]
        if marks is not None:
            marks[:, 0] = 2 * centre[0] - marks[:, 0]
        if k > 1:
            mirrored = feats[:, :n_hu].reshape(-1, k, k, k)[:, ::-1].reshape(len(feats), -1)
            feats = np.ascontiguousarray(np.concatenate([mirrored, feats[:, n_hu:]], axis=1))
    c, s = np.cos(p.angle_rad), np.sin(p.angle_rad)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) * p.scale
    if np.allclose(rot, np.eye(3)):
        icoords = np.rint(coords).astype(np.int64)
    else:
        icoords, source = _resample(np.rint(coords).astype(np.int64), rot, centre)
        feats = feats[source]
    low = icoords.min(axis=0)
    icoords -= low
    if marks is not None:  # findings move with the sites (their radius is in mm)
        marks[:, :3] = (marks[:, :3] - centre) @ rot.T + centre - low
    if p.hu_shift:
        scale = float(sv.params.get("hu_scale", 1000.0))
        feats = feats.copy()
        feats[:, :n_hu] += np.float32(p.hu_shift / scale)
    return _moved(sv, icoords, feats, marks)


DENSE_CELLS = 1 << 26  # boxes up to this many cells (64 MB of flags) are marked, not sorted


def _keys(cells: npt.NDArray[np.int64], low: npt.NDArray[np.int64], size: npt.NDArray[np.int64]) -> Any:
    c = cells - low
    return (c[:, 0] * size[1] + c[:, 1]) * size[2] + c[:, 2]


def _cells(keys: npt.NDArray[np.int64], low: npt.NDArray[np.int64], size: npt.NDArray[np.int64]) -> Any:
    return np.stack([keys // (size[1] * size[2]), keys // size[2] % size[1], keys % size[2]], axis=1) + low


def _resample(
    cells: npt.NDArray[np.int64], rot: npt.NDArray[np.float64], centre: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """Nearest-neighbour resampling of the set of sites `cells` under x -> rot (x - centre) +
    centre: the cells of the moved set and, for each, the row of the site it was taken from."""
    moved = (cells - centre) @ rot.T + centre
    # a cell maps back into site s's cell when it lies within `reach` of s moved, axis by axis
    reach = 0.5 * np.abs(rot).sum(axis=1)
    n = int(np.ceil(reach.max()))
    steps = np.arange(1 - n, n + 1)
    offsets = np.array(np.meshgrid(steps, steps, steps, indexing="ij")).reshape(3, -1).T
    base = np.floor(moved).astype(np.int64)
    lo, size = base.min(axis=0) + 1 - n, base.max(axis=0) - base.min(axis=0) + 2 * n
    keys = (_keys(base, lo, size)[:, None] + _keys(offsets + lo, lo, size)[None]).reshape(-1)
    if int(np.prod(size)) <= DENSE_CELLS:  # a mask over the box is faster than sorting
        seen = np.zeros(int(np.prod(size)), dtype=bool)
        seen[keys] = True
        keys = np.flatnonzero(seen)
    else:
        keys = np.unique(keys)
    target = _cells(keys, lo, size)
    back = np.rint((target - centre) @ np.linalg.inv(rot).T + centre).astype(np.int64)
    low = cells.min(axis=0)
    extent = cells.max(axis=0) - low + 1
    inside = np.all((back >= low) & (back < low + extent), axis=1)
    target, back = target[inside], back[inside]
    site_keys = _keys(cells, low, extent)
    order = np.argsort(site_keys)
    wanted = _keys(back, low, extent)
    at = np.minimum(np.searchsorted(site_keys[order], wanted), len(order) - 1)
    hit = site_keys[order][at] == wanted
    if not hit.any():  # a few isolated sites squeezed between cells: keep them where they moved
        kept, first = np.unique(np.rint(moved).astype(np.int64), axis=0, return_index=True)
        return kept, first
    return target[hit], order[at[hit]]


def _moved(sv: SparseVolume, coords: Any, feats: Any, marks: Any) -> SparseVolume:
    """`sv` with new sites (non-negative coordinates) and findings, on the grid that holds them."""
    grid = tuple(int(v) + 1 for v in coords.max(axis=0))
    return replace(
        sv,
        coords=np.ascontiguousarray(coords, dtype=np.int32),
        feats=np.ascontiguousarray(feats, dtype=np.float32),
        grid_shape=(grid[0], grid[1], grid[2]),
        marks=marks,
    )


ALIGN = 16  # a multiple of the total stride of any network of up to five stages


def orient(
    sv: SparseVolume, flips: tuple[bool, bool, bool], order: tuple[int, int, int], offset: Any = (0, 0, 0)
) -> SparseVolume:
    """One of the grid's own symmetries: the axes reordered (new axis i is old axis order[i]),
    then flipped where `flips` says, about the first site (a candidate ball's maximum); the
    result starts at `offset` on every axis. Patch values move with their block; the scalar
    channels after them do not change."""
    k = _patch_size(sv)
    n_hu = k**3
    coords = sv.coords.astype(np.int64)
    rel = (coords - coords[0])[:, list(order)]
    rel = np.where(np.asarray(flips), -rel, rel)
    coords = rel - rel.min(axis=0) + np.asarray(offset, dtype=np.int64)
    feats = sv.feats
    if k > 1:
        block = feats[:, :n_hu].reshape(-1, k, k, k).transpose(0, *(1 + np.asarray(order)))
        for axis, flip in enumerate(flips):
            if flip:
                block = np.flip(block, axis=axis + 1)
        feats = np.concatenate([block.reshape(len(feats), -1), feats[:, n_hu:]], axis=1)
    return _moved(sv, coords, feats, None)


def aligned(sv: SparseVolume) -> SparseVolume:
    """`sv` moved by whole sites so that its first site (a candidate ball's maximum) sits on a
    multiple of ALIGN on every axis, with no negative coordinate.

    A network with stride-2 stages is not shift-invariant: where a ball's centre falls among the
    cells of each stage changes its features. Every ball is aligned before the network sees it,
    at training and at predict, so the network learns one placement of the centre instead of
    all 16^3 a scan can give it."""
    coords = sv.coords.astype(np.int64)
    rel = coords - coords[0]
    base = ALIGN * -(-int(-rel.min(initial=0)) // ALIGN)
    marks = None
    if sv.marks is not None:
        marks = sv.marks.copy()
        marks[:, :3] += base - coords[0]
    return _moved(sv, rel + base, sv.feats, marks)


def random_orientation(sv: SparseVolume, rng: np.random.Generator) -> SparseVolume:
    """`orient` with every axis flipped at random and the axes whose site sizes agree (within
    1 %) shuffled: all 48 orientations of the cube on an isotropic grid, the 16 that keep the
    slice axis on 2.5 x 2.5 x 5 mm sites. The ball starts at a random offset below ALIGN on every
    axis (which `aligned` undoes where balls meet the network)."""
    mm = np.asarray(sv.spacing)
    order = list(range(3))
    groups: dict[int, list[int]] = {}  # axes of equal site size, keyed by the first of them
    for a in range(3):
        key = min(b for b in range(3) if abs(mm[a] - mm[b]) <= 0.01 * max(mm[a], mm[b]))
        groups.setdefault(key, []).append(a)
    for axes in groups.values():
        for a, b in zip(axes, rng.permutation(axes), strict=True):
            order[a] = int(b)
    flips = tuple(bool(f) for f in rng.random(3) < 0.5)
    offset = rng.integers(0, ALIGN, 3)
    return orient(sv, (flips[0], flips[1], flips[2]), (order[0], order[1], order[2]), offset)
