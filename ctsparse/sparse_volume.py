"""SparseVolume: the kept sites of a CT volume, and its compact on-disk cache format.

A cache file is an uncompressed .npz (coordinates and features dominate; zlib buys little on float
features and costs decode time every epoch) written to a temporary name and renamed, so a crash
mid-write never leaves a file that reads back as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ctsparse.fileio import atomic_write

# 2: sites in Fortran (z, y, x) order, centred resampling grid
# 3: stats carry the scan's own spacing, HU percentiles and kept volume (ctsparse/ood.py)
CACHE_FORMAT = 3


@dataclass(frozen=True)
class SparseVolume:
    """Kept sites of one scan.

    Attributes:
        coords: int32 (N, 3) site indices on the (cropped, possibly patched) grid, C-contiguous.
        feats: float32 (N, C) features per site (normalized HU, or k^3 patch values).
        grid_shape: shape of the grid the coordinates index.
        affine: 4x4 float64, site index -> RAS+ mm (includes the crop offset and patch stride).
        params: the preprocessing parameters used (a dict of PreprocessConfig).
        stats: counts and timings: voxels in, kept, dropped by threshold / body mask, ...
        source: the path it was read from.
        marks: float64 (F, 4) findings known in this scan, if any: centre in site-index
            coordinates and radius in mm (train attaches them from DATA/findings.csv; never cached).
    """

    coords: npt.NDArray[np.int32]
    feats: npt.NDArray[np.float32]
    grid_shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    marks: npt.NDArray[np.float64] | None = None

    @property
    def n_sites(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.feats.shape[1])

    @property
    def spacing(self) -> tuple[float, float, float]:
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def occupancy(self) -> float:
        """Kept sites over grid sites (of the cropped grid the network sees)."""
        total = int(np.prod(self.grid_shape))
        return self.n_sites / total if total else 0.0

    def dense(self) -> npt.NDArray[np.float32]:
        """(C, X, Y, Z) dense array with zeros at dropped sites (the dense twin's input)."""
        out = np.zeros((self.n_channels, *self.grid_shape), dtype=np.float32)
        c = self.coords
        out[:, c[:, 0], c[:, 1], c[:, 2]] = self.feats.T
        return out

    def with_findings(self, world: npt.NDArray[np.float64]) -> SparseVolume:
        """This scan with findings given as (F, 4) rows of RAS+ mm centre and radius in mm."""
        world = np.asarray(world, dtype=np.float64).reshape(-1, 4)
        site = np.linalg.solve(self.affine, np.c_[world[:, :3], np.ones(len(world))].T).T[:, :3]
        return replace(self, marks=np.c_[site, world[:, 3]])

    def nbytes(self) -> int:
        return int(self.coords.nbytes + self.feats.nbytes)


def rows_of(table: npt.NDArray[Any], query: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    """For each coordinate of `query` (N, 3) the row of `table` (M, 3) that holds it (ME keeps
    its own row order, so rows are matched by value, never assumed).

    Raises:
        RuntimeError: a query coordinate is not in the table.
    """
    table, query = table.astype(np.int64), query.astype(np.int64)
    dims = np.maximum(table.max(axis=0), query.max(axis=0)) + 1
    keys = np.ravel_multi_index(table.T, dims)
    order = np.argsort(keys)
    pos = np.searchsorted(keys, np.ravel_multi_index(query.T, dims), sorter=order)
    rows: npt.NDArray[np.intp] = order[np.minimum(pos, len(order) - 1)]
    if not np.array_equal(table[rows], query):
        raise RuntimeError("a site has no covering cell in the sparse tensor")
    return rows


def save_sparse(sv: SparseVolume, path: str | Path) -> None:
    """Write atomically: temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CACHE_FORMAT,
        "grid_shape": list(sv.grid_shape),
        "params": sv.params,
        "stats": sv.stats,
        "source": sv.source,
    }
    with atomic_write(path) as fh:
        np.savez(
            fh,
            coords=sv.coords,
            feats=sv.feats,
            affine=sv.affine,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )


def load_sparse(path: str | Path) -> SparseVolume:
    """Read a cache file. Raises ValueError if it is not a complete file of the current format."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"cache format {meta.get('format')} != {CACHE_FORMAT}")
            return SparseVolume(
                coords=np.ascontiguousarray(z["coords"], dtype=np.int32),
                feats=np.ascontiguousarray(z["feats"], dtype=np.float32),
                grid_shape=(
                    int(meta["grid_shape"][0]),
                    int(meta["grid_shape"][1]),
                    int(meta["grid_shape"][2]),
                ),
                affine=np.asarray(z["affine"], dtype=np.float64),
                params=meta["params"],
                stats=meta["stats"],
                source=meta["source"],
            )
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise ValueError(f"invalid cache file {path}: {exc}") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends from a truncated file
        raise ValueError(f"invalid cache file {path}: {exc}") from exc


def content_key(path: str | Path, params: dict[str, Any]) -> str:
    """Cache key from the scan's bytes (every file of a DICOM folder, a MetaImage header and its
    data file) and the preprocessing params.

    Hashing content, not mtimes, means a copied or touched dataset still hits the cache, and a
    re-exported scan with the same name does not.
    """
    from ctsparse.io.metaimage import data_file, is_metaimage_name

    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if is_metaimage_name(p) and (data := data_file(p)) is not None and data.is_file():
        files.append(data)
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(str(CACHE_FORMAT).encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    root = os.environ.get("CTSPARSE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ctsparse") / "sparse"
