"""Scans -> SparseVolumes through the on-disk cache, optionally in worker processes.

Decoding DICOM and sparsifying dominate the first epoch; workers fill the cache in parallel, and
later epochs (and later runs with the same preprocessing) read the cache only.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ctsparse.config import PreprocessConfig
from ctsparse.errors import CtsparseError
from ctsparse.sparse import SparseVolume

Progress = Callable[[int, int, str], None]


def _one(path: str, cfg: PreprocessConfig, cache_dir: str | None) -> SparseVolume | str:
    from ctsparse.sparsify import sparsify_cached

    try:
        sv, _hit = sparsify_cached(path, cfg, cache_dir=cache_dir)
        return sv
    except CtsparseError as exc:
        return str(exc)
    except Exception as exc:  # a scan that breaks a reader in an unforeseen way must not stop the rest
        return f"{path}: {type(exc).__name__}: {exc}"


def prepare_scans(
    paths: Sequence[Path],
    cfg: PreprocessConfig,
    cache_dir: str | None = None,
    workers: int = 0,
    progress: Progress | None = None,
) -> list[SparseVolume | str]:
    """One result per path, in order: a SparseVolume, or the one-line error for a bad scan."""
    results: list[SparseVolume | str] = [""] * len(paths)
    if workers <= 0 or len(paths) <= 1:
        for i, p in enumerate(paths):
            results[i] = _one(str(p), cfg, cache_dir)
            if progress:
                progress(i + 1, len(paths), str(p))
        return results
    # spawn: worker processes must not inherit torch/OpenMP thread pools from the parent
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_one, str(p), cfg, cache_dir): i for i, p in enumerate(paths)}
        for done, fut in enumerate(as_completed(futures), start=1):
            i = futures[fut]
            results[i] = fut.result()
            if progress:
                progress(done, len(paths), str(paths[i]))
    return results
