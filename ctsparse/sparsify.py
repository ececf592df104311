"""Volume -> SparseVolume: resample, threshold, body mask, crop, encode features.

Conventions (all exact, all in the affine):
- Resampling (``ctsparse.io.resample``) centres the new grid on the old one: floor(n * old/new)
  voxels per axis, new voxel i centred at old voxel coordinate a + i * new/old with
  a = (n_old - 1)/2 - (n_new - 1)/2 * new/old, so the new voxels stay inside the old field of view
  with equal margins at both ends. Downsampling averages the old voxels each new voxel covers
  (weighted by overlap: anti-aliased, partial-volume-like); upsampling is linear.
- Crop translates the affine by the bounding-box offset.
- Patch features: site (i, j, k) is the block of voxels k*i .. k*i+k-1 along each axis, and the
  site affine maps it to the world position of the *centre* of that block.
- Sites are sorted by (z, y, x): the grid's Fortran order, the order DICOM and NIfTI volumes are
  stored in, so a 20 M-site native-resolution scan is encoded without transposing it. The same
  scan and params always give the same arrays, whatever the memory layout of the input.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.config import PreprocessConfig
from ctsparse.errors import ConfigError, ScanError
from ctsparse.masks import Box, body_in_box, bounding_box, c_view
from ctsparse.meters import stage
from ctsparse.sparse_volume import SparseVolume, content_key, default_cache_dir, load_sparse, save_sparse
from ctsparse.volume import Volume

# Body threshold for the connected-component mask. Air is -1000, fat -100: -500 splits them with
# a wide margin on every scanner, so the body is found the same way whatever the feature window.
BODY_HU = -500.0
# Value given to padding and to NaN voxels inside kept patch blocks: they are outside the scan.
AIR_HU = -1000.0
_SLAB = 8  # slices encoded at once: bounds the int64 index temporaries of np.nonzero

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def resample(
    array: FloatArray, affine: npt.NDArray[np.float64], spacing: tuple[float, float, float] | list[float]
) -> tuple[FloatArray, npt.NDArray[np.float64]]:
    """Resample to `spacing` mm: area average when coarser, linear when finer, grid centred on the
    old one (see module docstring). Returns the array and its exact affine."""
    from ctsparse.io.resample import resample_array

    return resample_array(array, affine, spacing)


def normalize(hu: FloatArray, cfg: PreprocessConfig) -> FloatArray:
    """Clip to the window, then (HU - center) / scale. NaN becomes air (clipped and scaled)."""
    out = np.array(hu, dtype=np.float32)  # one copy, then in place: 20 M sites at native resolution
    out[np.isnan(out)] = AIR_HU
    if cfg.window is not None:
        np.clip(out, cfg.window[0], cfg.window[1], out=out)
    out -= np.float32(cfg.hu_center)
    out /= np.float32(cfg.hu_scale)
    return out


def _encode_hu(hu: FloatArray, keep: BoolArray, cfg: PreprocessConfig, n: int) -> tuple[Any, Any]:
    # Walked as (z, y, x) in slabs of a few slices: Fortran order without a transposed copy, and
    # int64 index temporaries of one slab instead of 3 x 8 bytes per site at once.
    hu_t, keep_t = hu.T, keep.T
    coords = np.empty((n, 3), dtype=np.int32)
    values = np.empty(n, dtype=np.float32)
    pos = 0
    for z0 in range(0, keep_t.shape[0], _SLAB):
        k = keep_t[z0 : z0 + _SLAB]
        zz, yy, xx = np.nonzero(k)
        m = zz.size
        coords[pos : pos + m, 0], coords[pos : pos + m, 1], coords[pos : pos + m, 2] = xx, yy, zz + z0
        values[pos : pos + m] = hu_t[z0 : z0 + _SLAB][k]
        pos += m
    return coords, normalize(values, cfg)[:, None]


def _encode_patch(hu: FloatArray, keep: BoolArray, cfg: PreprocessConfig) -> tuple[Any, Any]:
    # Dropped voxels inside a kept block keep their real (normalized) values: the block is an
    # image patch, and zeroing e.g. lung air next to tissue would invent a sharp artificial edge.
    # Worked on the (z, y, x) views, so that sites come out in Fortran order (module docstring).
    k = cfg.patch_size
    hu_t, keep_t = hu.T, keep.T
    pad = [(0, -n % k) for n in hu_t.shape]
    if any(p[1] for p in pad):
        hu_t = np.pad(hu_t, pad, constant_values=AIR_HU)
        keep_t = np.pad(keep_t, pad, constant_values=False)
    b = tuple(n // k for n in hu_t.shape)
    blocks = keep_t.reshape(b[0], k, b[1], k, b[2], k).any(axis=(1, 3, 5))
    cz, cy, cx = np.nonzero(blocks)
    coords = np.ascontiguousarray(np.stack([cx, cy, cz], axis=1), dtype=np.int32)
    hu6 = hu_t.reshape(b[0], k, b[1], k, b[2], k)
    # Advanced indices separated by slices move to the front: (N, dz, dy, dx) -> channels dx, dy, dz.
    patches = hu6[cz, :, cy, :, cx, :].transpose(0, 3, 2, 1).reshape(len(cz), k**3)
    return coords, np.ascontiguousarray(normalize(patches, cfg), dtype=np.float32)


def blob_on_scan_grid(cfg: PreprocessConfig) -> bool:
    """Whether the blob filter runs on the scan's own grid rather than the resampled one: with
    preprocess.blob_grid "scan", when resampling leaves a voxel coarser than the filter's smallest
    scale along some axis. There, resampling first blurs a small nodule before the filter sees
    it; on a grid finer than the scale it does not, and the resampled grid is cheaper."""
    return (
        cfg.blob_channel
        and cfg.blob_grid == "scan"
        and cfg.spacing is not None
        and max(cfg.spacing) > min(cfg.blob_scales_mm, default=0.0)
    )


def read_spacing(cfg: PreprocessConfig) -> tuple[float, float, float] | list[float] | None:
    """The spacing to resample to while reading: cfg.spacing, or None when the blob filter wants
    the scan's own grid (sparsify then resamples after it has kept that grid for the filter)."""
    return None if blob_on_scan_grid(cfg) else cfg.spacing


def _blob_here(hu: FloatArray, keep: BoolArray, voxel_mm: Any, cfg: PreprocessConfig) -> FloatArray:
    """The dot-enhancement filter (ctsparse/filters.py) at the kept voxels of this grid, 0 elsewhere."""
    from ctsparse.filters import dot_enhancement

    dense = np.zeros(keep.shape, dtype=np.float32)
    dense[keep] = dot_enhancement(hu, voxel_mm, cfg.blob_scales_mm, keep, cfg.blob_hu_max)
    return dense


def _blob_from_scan(
    scan_hu: FloatArray, scan_affine: npt.NDArray[np.float64], grid_affine: npt.NDArray[np.float64],
    keep: BoolArray, cfg: PreprocessConfig,
) -> FloatArray | None:  # fmt: skip
    """The filter run on the scan's own grid and carried to `keep`'s (resampled, cropped) grid:
    each kept voxel gets the maximum over the scan voxels nearest to it (at least the one nearest
    its centre). None when the two grids are not axis-aligned scalings of each other."""
    from ctsparse.filters import dot_enhancement
    from ctsparse.io.geometry import axis_index_maps, inside_grid

    to_grid = axis_index_maps(np.linalg.solve(grid_affine, scan_affine), scan_hu.shape, keep.shape)
    to_scan = axis_index_maps(np.linalg.solve(scan_affine, grid_affine), keep.shape, scan_hu.shape)
    if to_grid is None or to_scan is None:
        return None
    kept = np.nonzero(keep)
    # the scan block the grid covers: the scan voxels that fall in it, and each grid voxel's nearest
    box = []
    for ok, near_axis in zip(to_grid[1], to_scan[0], strict=True):
        ends = np.concatenate(
            [np.flatnonzero(ok)[[0, -1]] if ok.any() else [], [near_axis.min(), near_axis.max()]]
        )
        box.append(slice(int(ends.min()), int(ends.max()) + 1))
    maps = [m[b] for m, b in zip(to_grid[0], box, strict=True)]
    inside = inside_grid([ok[b] for ok, b in zip(to_grid[1], box, strict=True)])
    near = [n[k] - b.start for n, k, b in zip(to_scan[0], kept, box, strict=True)]
    at = keep[np.ix_(*maps)] & inside
    at[near[0], near[1], near[2]] = True
    voxel_mm = np.linalg.norm(scan_affine[:3, :3], axis=0)
    values = dot_enhancement(scan_hu[tuple(box)], voxel_mm, cfg.blob_scales_mm, at, cfg.blob_hu_max)
    on_scan = np.zeros(at.shape, dtype=np.float32)
    on_scan[at] = values
    dense = np.zeros(keep.shape, dtype=np.float32)
    p = np.nonzero(at & inside)
    np.maximum.at(dense, (maps[0][p[0]], maps[1][p[1]], maps[2][p[2]]), on_scan[p])
    dense[kept] = np.maximum(dense[kept], on_scan[near[0], near[1], near[2]])
    dense[~keep] = 0.0
    return dense


def _blob_channel(dense: FloatArray, coords: npt.NDArray[np.int32], cfg: PreprocessConfig) -> FloatArray:
    """The blob filter per site: its value at the voxel, or its maximum over the kept voxels of a
    patch block."""
    k = cfg.patch_size if cfg.features == "patch" else 1
    if k > 1:
        shape: tuple[int, ...] = dense.shape
        dense = np.pad(dense, [(0, -d % k) for d in shape])
        b = [-(-d // k) for d in shape]
        dense = dense.reshape(b[0], k, b[1], k, b[2], k).max(axis=(1, 3, 5))
    return dense[coords[:, 0], coords[:, 1], coords[:, 2]]


def candidate_balls(
    coords: npt.NDArray[np.int32], score: FloatArray, site_mm: Any, k: int, radius_mm: float
) -> list[npt.NDArray[np.intp]]:
    """The sites (row indices, the ball's maximum first) within radius_mm of each of the k
    strongest maxima of `score`, picked greedily: the highest remaining site, then everything
    within radius_mm of it is no longer a candidate. Balls may share sites."""
    pos = coords.astype(np.float32) * np.asarray(site_mm, dtype=np.float32)
    free = np.ones(len(score), dtype=bool)
    r2 = np.float32(radius_mm * radius_mm)
    balls = []
    for _ in range(k):
        if not free.any():
            break
        i = int(np.flatnonzero(free)[np.argmax(score[free])])
        ball = ((pos - pos[i]) ** 2).sum(axis=1) <= r2
        free &= ~ball
        rows = np.flatnonzero(ball)
        balls.append(np.concatenate([[i], rows[rows != i]]))
    return balls


def candidate_sites(
    coords: npt.NDArray[np.int32], score: FloatArray, site_mm: Any, k: int, radius_mm: float
) -> BoolArray:
    """The sites of the k candidate balls (`candidate_balls`), as a mask."""
    near = np.zeros(len(score), dtype=bool)
    for rows in candidate_balls(coords, score, site_mm, k, radius_mm):
        near[rows] = True
    return near


def _lungs(
    source: str, hu: FloatArray, body: BoolArray, affine: npt.NDArray[np.float64], cfg: PreprocessConfig
) -> BoolArray:
    from ctsparse.regions import NoRegionError, lung_region

    try:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        return lung_region(hu, body, spacing, cfg.lung_closing_mm, cfg.lung_grid_mm)
    except NoRegionError as e:
        raise ScanError(source, f"{e}; preprocess.region is 'lungs'") from None


def sparsify(volume: Volume, cfg: PreprocessConfig) -> SparseVolume:
    """Keep the voxels that carry anatomy and encode them as sparse sites.

    Body mask: the body is the largest 26-connected component of HU >= min(threshold, -500) with
    its in-plane holes filled (`body_region`), and kept voxels outside it are dropped. Filling the
    holes matters: a lung nodule or a vessel segment is surrounded by lung parenchyma below the
    threshold, so it is not connected to the chest wall, yet it is exactly the anatomy a classifier
    needs; the table and blankets, outside the body outline, are still removed. For a HU range
    such as a bone window (200..3000) the body is found at -500 and the range applied inside.

    Raises:
        ScanError: nothing survives the threshold (and body mask).
    """
    if cfg.region == "lungs" and not cfg.body_mask:
        raise ConfigError("preprocess.region", "'lungs' needs preprocess.body_mask: true")
    times: dict[str, float] = {}
    # the scan's own grid, also when the reader already resampled it (read_volume(spacing=...))
    shape_in = [int(n) for n in volume.meta.get("resampled_from", {}).get("shape", volume.shape)]
    stats: dict[str, Any] = {"voxels_in": int(np.prod(shape_in)), "grid_shape_in": shape_in}
    hu, affine = volume.array, volume.affine
    with stage(times, "resample"):
        if cfg.spacing is not None:
            hu, affine = resample(hu, affine, cfg.spacing)
    # the scan's own grid, for a blob filter that runs before resampling (preprocess.blob_grid)
    scan_grid = blob_on_scan_grid(cfg) and hu is not volume.array
    stats["grid_shape_resampled"] = list(hu.shape)
    with stage(times, "threshold"):
        keep = hu >= cfg.threshold  # NaN compares False: never kept
        if cfg.threshold_max is not None:
            keep &= hu <= cfg.threshold_max
        n_thr = int(np.count_nonzero(keep))
    if n_thr == 0:
        raise ScanError(volume.source, _nothing_survives(hu, cfg))
    with stage(times, "mask"):
        # Everything after this works inside `region`, the body's bounding box: no more passes
        # over the full grid, which at native resolution is mostly air.
        region: Box = (slice(0, hu.shape[0]), slice(0, hu.shape[1]), slice(0, hu.shape[2]))
        n_body = n_thr
        if cfg.body_mask:
            body_level = min(cfg.threshold, BODY_HU)
            body = keep if body_level == cfg.threshold and cfg.threshold_max is None else hu >= body_level
            found = body_in_box(body)
            if found is None:
                keep = keep[:0, :0, :0]
            else:
                region = found[0]
                keep = keep[region] & found[1]
                n_body = int(np.count_nonzero(keep))
                if cfg.region == "lungs":
                    keep &= _lungs(volume.source, hu[region], found[1], affine, cfg)
        n_kept = int(np.count_nonzero(keep))
    if n_kept == 0:
        where = "the lung region" if cfg.region == "lungs" else "the body mask"
        raise ScanError(volume.source, f"{_nothing_survives(hu, cfg)} inside {where}")
    with stage(times, "encode"):
        origin = [r.start for r in region]
        box = bounding_box(keep) if cfg.crop else None
        if box is not None:
            keep = keep[tuple(slice(lo, hi) for lo, hi in box)]
            origin = [o + lo for o, (lo, _) in zip(origin, box, strict=True)]
            hu = hu[tuple(slice(o, o + n) for o, n in zip(origin, keep.shape, strict=True))]
            affine = affine.copy()
            affine[:3, 3] = affine[:3, :3] @ np.array(origin, float) + affine[:3, 3]
        elif keep.shape != hu.shape:  # no crop: back on the full grid
            full = np.zeros(hu.shape, dtype=bool, order="F" if c_view(hu)[1] else "C")
            full[region] = keep
            keep = full
        cropped_shape = keep.shape
        grid_affine = affine
        voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
        if cfg.features == "patch" and cfg.patch_size > 1:
            coords, feats = _encode_patch(hu, keep, cfg)
            k = cfg.patch_size
            grid = tuple(-(-n // k) for n in cropped_shape)
            scale = np.diag([k, k, k, 1.0])
            scale[:3, 3] = (k - 1) / 2.0  # site index -> voxel index of the block centre
            affine = affine @ scale
        else:
            coords, feats = _encode_hu(hu, keep, cfg, n_kept)
            grid = cropped_shape
        if cfg.occupancy_channel:
            feats = np.concatenate([feats, np.ones((len(feats), 1), dtype=np.float32)], axis=1)
    if cfg.blob_channel:
        with stage(times, "blob"):
            dense = (
                _blob_from_scan(volume.array, volume.affine, grid_affine, keep, cfg) if scan_grid else None
            )
            if dense is None:
                dense = _blob_here(hu, keep, voxel_mm, cfg)
            feats = np.ascontiguousarray(
                np.concatenate([feats, _blob_channel(dense, coords, cfg)[:, None]], axis=1)
            )
        if cfg.blob_candidates > 0:
            with stage(times, "candidates"):
                site_mm = np.linalg.norm(affine[:3, :3], axis=0)
                near = candidate_sites(
                    coords, feats[:, -1], site_mm, cfg.blob_candidates, cfg.blob_candidate_mm
                )
                coords, feats = coords[near], np.ascontiguousarray(feats[near])
    n_in_grid = int(np.prod(stats["grid_shape_resampled"]))
    spacing_in = volume.meta.get("resampled_from", {}).get("spacing", volume.spacing)
    stats["spacing_in"] = [round(float(s), 6) for s in spacing_in]  # the scan's own voxel size (mm)
    stats.update(_intensity_stats(hu, keep, voxel_mm, n_kept))
    stats.update(
        voxels=n_in_grid,
        kept=n_kept,
        dropped_threshold=n_in_grid - n_thr,
        dropped_body_mask=n_thr - n_body,
        dropped_region=n_body - n_kept,
        grid_shape_cropped=[int(n) for n in cropped_shape],
        crop_offset=origin if box is not None else [0, 0, 0],
        occupancy_input=n_kept / n_in_grid,
        occupancy_cropped=n_kept / int(np.prod(cropped_shape)),
        sites=int(coords.shape[0]),
        times={k: round(v, 6) for k, v in times.items()},
    )
    return SparseVolume(
        coords=coords,
        feats=feats,
        grid_shape=(int(grid[0]), int(grid[1]), int(grid[2])),
        affine=affine,
        params=dataclasses.asdict(cfg),
        stats=stats,
        source=volume.source,
    )


def _intensity_stats(hu: FloatArray, keep: BoolArray, voxel_mm: Any, n_kept: int) -> dict[str, float]:
    """HU percentiles of the kept voxels and the kept volume in mL: what ctsparse.ood compares
    against the training scans. Above ~2 M kept voxels every s-th slice is enough for a
    percentile and avoids a copy of all of them."""
    step = max(1, -(-n_kept // 2_000_000))
    values = hu[..., ::step][keep[..., ::step]]
    if values.size == 0:  # kept voxels only in the slices skipped
        values = hu[keep]
    p1, p50, p99 = (float(v) for v in np.percentile(values, [1, 50, 99]))
    ml = n_kept * float(np.prod(voxel_mm)) / 1000.0
    return {"hu_p1": p1, "hu_p50": p50, "hu_p99": p99, "region_ml": ml}


def _nothing_survives(hu: FloatArray, cfg: PreprocessConfig) -> str:
    finite = hu[np.isfinite(hu)]
    rng = f"{float(finite.min()):g}..{float(finite.max()):g}" if finite.size else "all NaN"
    hi = f"..{cfg.threshold_max:g}" if cfg.threshold_max is not None else ""
    return f"no voxels survive the threshold of {cfg.threshold:g}{hi} HU (HU range of the scan: {rng})"


def sparsify_cached(
    path: str | Path, cfg: PreprocessConfig, cache_dir: str | Path | None = None, **read_kwargs: Any
) -> tuple[SparseVolume, bool]:
    """Read-through cache of read_volume + sparsify. Returns (sparse volume, cache hit).

    The key hashes the scan's bytes, the preprocessing params and the reader arguments (a series
    UID selects different content). An unreadable cache file is ignored and rewritten.
    """
    from ctsparse.io import read_volume

    params = {"preprocess": dataclasses.asdict(cfg), "read": {k: read_kwargs[k] for k in sorted(read_kwargs)}}
    key = content_key(path, params)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{key}.npz"
    if cache.is_file():
        try:
            return load_sparse(cache), True
        except ValueError:
            pass  # truncated or stale file: recompute and overwrite below
    # resampled while reading (a DICOM series never holds its full-resolution float32 volume),
    # unless the blob filter runs on the scan's own grid
    sv = sparsify(read_volume(path, spacing=read_spacing(cfg), **read_kwargs), cfg)
    save_sparse(sv, cache)
    return sv, False
