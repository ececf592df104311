"""The library side of `ctsparse profile`: per-scan sparsity and memory figures, and their summary.

Rows are plain JSON-ready dicts, so the CLI only renders them. A scan that fails becomes an error
row ``{"path": ..., "error": ...}`` and the others go on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.config import PreprocessConfig
from ctsparse.errors import CtsparseError
from ctsparse.inputs import InputItem
from ctsparse.meters import Timer, peak_memory
from ctsparse.sparse_volume import SparseVolume
from ctsparse.sparsify import sparsify

DEFAULT_SWEEP: tuple[float, ...] = (-900, -700, -500, -300, -100, 100, 300, 500)
PERCENTILES: tuple[int, ...] = (1, 5, 25, 50, 75, 95, 99)
# 1-HU bins over the int16 range: values outside are clamped into the end bins, which keeps every
# count ">= t" exact for integer t inside the range.
_LO, _HI = -32768, 32767
_CHUNK = 1 << 22
# Memory model of one scan in the network. Values (features, activations) are float32. A site's
# coordinates are int32 x, y, z in the SparseVolume (and its cache file); collate prepends the
# batch index for MinkowskiEngine, so the engine holds 4 int32 per site, once per stride level,
# shared by every layer at that stride. ME's coordinate hash table and kernel maps come on top
# and are not counted here.
VALUE_BYTES = 4
STORED_COORD_BYTES = 3 * 4
ENGINE_COORD_BYTES = 4 * 4


def hu_histogram(array: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.int64], int]:
    """Counts of floor(HU) in 1-HU bins from -32768 (one pass, chunked); and the number of NaN."""
    flat = array.reshape(-1)
    counts = np.zeros(_HI - _LO + 1, dtype=np.int64)
    n_nan = 0
    for i in range(0, flat.size, _CHUNK):
        chunk = flat[i : i + _CHUNK]
        finite = np.isfinite(chunk)
        if not finite.all():
            n_nan += int(np.count_nonzero(np.isnan(chunk)))
            chunk = chunk[finite | np.isinf(chunk)]
        idx = np.clip(np.floor(chunk), _LO, _HI).astype(np.int64) - _LO
        counts += np.bincount(idx, minlength=counts.size)
    return counts, n_nan


def sweep_counts(
    counts: npt.NDArray[np.int64], thresholds: Iterable[float], array: npt.NDArray[np.float32] | None = None
) -> dict[str, int]:
    """Voxels with HU >= t for each t, from the histogram's tail sums (exact for integer t; other t
    are counted directly on `array` when given, else rounded up to the next integer)."""
    tail = np.cumsum(counts[::-1])[::-1]  # tail[i] = count of floor(HU) >= i + _LO
    out: dict[str, int] = {}
    for t in thresholds:
        if float(t).is_integer() or array is None:
            i = int(np.ceil(t)) - _LO
            out[f"{t:g}"] = int(tail[i]) if 0 <= i < tail.size else (int(tail[0]) if i < 0 else 0)
        else:
            out[f"{t:g}"] = int(np.count_nonzero(array >= t))
    return out


def percentiles_from_hist(counts: npt.NDArray[np.int64], qs: Sequence[float]) -> dict[str, float]:
    """Percentiles to 1 HU (the lower edge of the bin holding the q-th voxel)."""
    cum = np.cumsum(counts)
    total = int(cum[-1]) if cum.size else 0
    if total == 0:
        return {f"p{q:g}": float("nan") for q in qs}
    ranks = np.ceil(np.asarray(qs, dtype=np.float64) / 100.0 * total).clip(1, total)
    bins = np.searchsorted(cum, ranks, side="left")
    return {f"p{q:g}": float(b + _LO) for q, b in zip(qs, bins, strict=True)}


def coarse_histogram(
    counts: npt.NDArray[np.int64], lo: int = -1100, hi: int = 2100, width: int = 10
) -> dict[str, list[float]]:
    """Bins of `width` HU over [lo, hi) for plotting; values outside fall into the end bins."""
    sub = counts[lo - _LO : hi - _LO].copy()
    sub[0] += counts[: lo - _LO].sum()
    sub[-1] += counts[hi - _LO :].sum()
    coarse = sub.reshape(-1, width).sum(axis=1)
    return {"edges": [float(e) for e in range(lo, hi + 1, width)], "counts": [int(c) for c in coarse]}


def kept_slices(
    sv: SparseVolume, native_affine: npt.NDArray[np.float64], native_shape: Sequence[int]
) -> list[npt.NDArray[np.bool_]]:
    """Kept-site masks on the three orthogonal mid-slices of the native grid (for overlays).

    Crop, resampling and patching only scale and translate voxel indices, so each native index maps
    to the nearest site index along its own axis.
    """
    t = np.linalg.solve(native_affine, sv.affine)
    maps, valid = [], []
    for a in range(3):
        idx = np.rint((np.arange(native_shape[a]) - t[a, 3]) / t[a, a]).astype(np.int64)
        ok = (idx >= 0) & (idx < sv.grid_shape[a])
        maps.append(np.where(ok, idx, 0))
        valid.append(ok)
    out = []
    for a in range(3):
        b, c = (x for x in range(3) if x != a)
        m = native_shape[a] // 2
        plane = np.zeros((native_shape[b], native_shape[c]), dtype=bool)
        if valid[a][m]:
            sel = sv.coords[sv.coords[:, a] == maps[a][m]]
            site2d = np.zeros((sv.grid_shape[b], sv.grid_shape[c]), dtype=bool)
            site2d[sel[:, b], sel[:, c]] = True
            plane = site2d[np.ix_(maps[b], maps[c])] & np.outer(valid[b], valid[c])
        out.append(plane)
    return out


def memory_breakdown(sites: int, channels: int, grid_shape: Sequence[int], width: int) -> dict[str, Any]:
    """Where sparsity saves memory: the network's input and its first layer, sparse against dense.

    The sparse input pays ENGINE_COORD_BYTES of coordinates per site on top of its features, so
    with few channels it is smaller than the dense grid only when few cells are occupied
    (``break_even_occupancy``). Activations have no such overhead (the coordinates are shared):
    from the first layer on, sparse costs sites x width and dense cells x width.

    Args:
        grid_shape: the cropped grid of sites, which the dense twin fills (zeros where no site).
        width: output channels of the network's first layer (model.widths[0]).
    """
    cells = int(np.prod(grid_shape))
    coords = sites * ENGINE_COORD_BYTES
    feats = sites * channels * VALUE_BYTES
    dense_in = cells * channels * VALUE_BYTES
    act_sparse, act_dense = sites * width * VALUE_BYTES, cells * width * VALUE_BYTES
    return {
        "sites": sites,
        "grid_cells": cells,
        "site_occupancy": sites / cells if cells else float("nan"),
        "channels": channels,
        "width": width,
        "stored_bytes": sites * (STORED_COORD_BYTES + channels * VALUE_BYTES),
        "input": {
            "coords_bytes": coords,
            "feats_bytes": feats,
            "sparse_bytes": coords + feats,
            "dense_bytes": dense_in,
            "break_even_occupancy": channels * VALUE_BYTES / (channels * VALUE_BYTES + ENGINE_COORD_BYTES),
        },
        "first_layer": {"sparse_bytes": act_sparse, "dense_bytes": act_dense},
    }


def profile_scan(
    scan: str | Path | InputItem,
    cfg: PreprocessConfig,
    *,
    thresholds: Sequence[float] = DEFAULT_SWEEP,
    width: int = 16,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    plot_data: bool = False,
) -> dict[str, Any]:
    """Sparsity, memory and time figures for one scan; an error row if it cannot be used.

    Args:
        scan: a path, or an item of ``ctsparse.inputs.expand_inputs`` (one series of a folder,
            named in the row).
        width: the first layer's channels, for the activation figures (model.widths[0]).

    With plot_data=True the row also carries "_plot" (histogram and mid-slices as numpy arrays),
    which is not JSON: the caller pops it before writing.
    """
    from ctsparse.io import read_volume

    item = scan if isinstance(scan, InputItem) else InputItem(Path(scan), series_uid)
    path, named = item.path, item.describe()
    if item.error is not None:
        return {"path": str(path), **named, "error": item.error}
    timer = Timer()
    try:
        with peak_memory() as mem:
            with timer.stage("read"):
                vol = read_volume(path, allow_non_ct=allow_non_ct, **item.read_kwargs())
            with timer.stage("stats"):
                counts, n_nan = hu_histogram(vol.array)
                finite = int(counts.sum())
                sweep = sweep_counts(counts, thresholds, vol.array)
                hu: dict[str, float] = {"min": float("nan"), "max": float("nan")}
                if finite:
                    hu = {"min": float(np.nanmin(vol.array)), "max": float(np.nanmax(vol.array))}
                hu.update(percentiles_from_hist(counts, PERCENTILES))
            sv = sparsify(vol, cfg)
    except CtsparseError as exc:
        return {"path": str(path), **named, "error": getattr(exc, "reason", str(exc))}
    except Exception as exc:  # a reader bug or odd file must not stop the other scans' report
        return {"path": str(path), **named, "error": f"{type(exc).__name__}: {exc}"}
    st = sv.stats
    n_vox = int(np.prod(vol.shape))
    row: dict[str, Any] = {
        "path": str(path),
        **named,
        "dims": list(vol.shape),
        "spacing": [round(s, 4) for s in vol.spacing],
        "hu": hu,
        "nan_voxels": n_nan,
        "threshold": cfg.threshold,
        "threshold_max": cfg.threshold_max,
        "features": cfg.features if cfg.features == "hu" else f"patch{cfg.patch_size}",
        "grid": list(sv.grid_shape),
        "channels": sv.n_channels,
        "sites": sv.n_sites,
        "kept_voxels": st["kept"],
        "dropped_threshold": st["dropped_threshold"],
        "dropped_body_mask": st["dropped_body_mask"],
        "dropped_region": st.get("dropped_region", 0),
        "occupancy": st["occupancy_input"],
        "occupancy_cropped": st["occupancy_cropped"],
        "site_occupancy": sv.occupancy,
        "volume_bytes": n_vox * VALUE_BYTES,  # the scan as read: float32 HU on its own grid
        "memory": memory_breakdown(sv.n_sites, sv.n_channels, sv.grid_shape, width),
        "sweep": {k: v / n_vox for k, v in sweep.items()},
        "times": {k: round(v, 6) for k, v in {**timer.times, **st["times"]}.items()},
        "peak_rss_bytes": mem.peak_bytes,
        "peak_delta_bytes": mem.delta_bytes,
        "warnings": vol.warnings,
    }
    if plot_data:
        arr = vol.array
        mid = [s // 2 for s in vol.shape]
        row["_plot"] = {
            "hist": coarse_histogram(counts),
            "slices": [arr[mid[0], :, :], arr[:, mid[1], :], arr[:, :, mid[2]]],
            "kept": kept_slices(sv, vol.affine, vol.shape),
            "spacing": list(vol.spacing),
        }
    return row


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians and ranges of occupancy, totals of sites/bytes/time, counts of ok and failed scans."""
    ok = [r for r in rows if "error" not in r]
    total = {key: int(sum(r[key] for r in ok)) for key in ("sites", "kept_voxels", "volume_bytes")}
    for part in ("input", "first_layer"):
        for key in ("sparse_bytes", "dense_bytes") + (
            ("coords_bytes", "feats_bytes") if part == "input" else ()
        ):
            total[f"{part}_{key}"] = int(sum(r["memory"][part][key] for r in ok))
    return {
        "n_scans": len(rows),
        "n_ok": len(ok),
        "n_failed": len(rows) - len(ok),
        "occupancy": _stats([r["occupancy"] for r in ok]),
        "occupancy_cropped": _stats([r["occupancy_cropped"] for r in ok]),
        "site_occupancy": _stats([r["site_occupancy"] for r in ok]),
        "total": total,
        "seconds": round(sum(sum(r["times"].values()) for r in ok), 6),
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in ok), default=0),
        "failed": [{"path": r["path"], "error": r["error"]} for r in rows if "error" in r],
    }
