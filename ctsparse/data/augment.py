"""Sparse augmentations on coordinates and values.

As in TorchIO, randomness is kept apart from application: `make_params` draws the values with a
Generator, `apply` is deterministic. This makes an augmented sample reproducible from its params.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

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
    """Flip / rotate / scale the site coordinates, shift the HU features.

    Rotated and scaled coordinates are rounded back to the grid; sites landing on the same cell
    keep the first one (at |scale - 1| <= 0.1 and small angles this drops a few percent of sites).
    For patch features a flip also mirrors the k^3 values inside each block; rotations move whole
    blocks only, an approximation that is good for the small angles used here.
    """
    coords = sv.coords.astype(np.float64)
    feats = sv.feats
    k = _patch_size(sv)
    centre = (np.asarray(sv.grid_shape, dtype=np.float64) - 1) / 2
    # channels after the k^3 HU values (the blob filter) are rotation- and flip-invariant scalars
    n_hu = k**3
    if p.flip_lr:
        coords[:, 0] = 2 * centre[0] - coords[:, 0]
        if k > 1:
            mirrored = feats[:, :n_hu].reshape(-1, k, k, k)[:, ::-1].reshape(len(feats), -1)
            feats = np.ascontiguousarray(np.concatenate([mirrored, feats[:, n_hu:]], axis=1))
    c, s = np.cos(p.angle_rad), np.sin(p.angle_rad)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) * p.scale
    coords = (coords - centre) @ rot.T + centre
    icoords = np.rint(coords).astype(np.int64)
    icoords -= icoords.min(axis=0)
    _, first = np.unique(icoords, axis=0, return_index=True)
    first.sort()
    icoords = icoords[first]
    feats = feats[first]
    if p.hu_shift:
        scale = float(sv.params.get("hu_scale", 1000.0))
        feats = feats.copy()
        feats[:, :n_hu] += np.float32(p.hu_shift / scale)
    grid = tuple(int(v) + 1 for v in icoords.max(axis=0))
    return replace(
        sv,
        coords=np.ascontiguousarray(icoords, dtype=np.int32),
        feats=np.ascontiguousarray(feats, dtype=np.float32),
        grid_shape=(grid[0], grid[1], grid[2]),
    )
