"""Scans -> SparseVolumes, optionally in worker processes.

Decoding DICOM and sparsifying dominate the first epoch of training and most of a predict run.
`prepare_scans` fills the on-disk cache (train); `iter_prepared` streams read + sparsify results
with per-stage timings (predict). Both return one result per input, in input order, and turn a
scan that fails into its one-line error instead of stopping the others, even when it kills its
worker process (a decoder crash, the OOM killer).
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctsparse.config import PreprocessConfig
from ctsparse.errors import CtsparseError
from ctsparse.inputs import InputItem
from ctsparse.sparse_volume import SparseVolume

Progress = Callable[[int, int, str], None]


def _pool(workers: int) -> ProcessPoolExecutor:
    # spawn: worker processes must not inherit torch/OpenMP thread pools from the parent
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def imap_isolated(fn: Callable[..., Any], items: Sequence[tuple[Any, ...]], workers: int) -> Iterator[Any]:
    """fn(*item) for each item in `workers` spawned processes, yielded in input order, at most
    2 x workers items ahead (so a slow consumer does not make results pile up in memory).

    A worker that dies takes the pool down with every item in flight. Those items are then rerun
    one per fresh process, so only the item that kills its process again yields an error string;
    the others, and the items after them, are processed as usual.
    """
    i = 0
    while i < len(items):
        in_flight: range = range(0)
        with _pool(workers) as pool:
            pending: deque[Future[Any]] = deque()
            nxt = i
            try:
                while i < len(items):
                    while nxt < len(items) and len(pending) < 2 * workers:
                        pending.append(pool.submit(fn, *items[nxt]))
                        nxt += 1
                    result = pending[0].result()
                    pending.popleft()
                    i += 1
                    yield result
            except BrokenProcessPool:
                in_flight = range(i, nxt)
        for k in in_flight:
            with _pool(1) as solo:
                try:
                    yield solo.submit(fn, *items[k]).result()
                except BrokenProcessPool:
                    yield f"{items[k][0]}: the process reading it died (crash or out of memory)"
            i += 1


def _error(path: str, exc: Exception) -> str:
    if isinstance(exc, CtsparseError):
        return str(exc)
    # a scan that breaks a reader in an unforeseen way must not stop the rest
    return f"{path}: {type(exc).__name__}: {exc}"


def _one(path: str, cfg: PreprocessConfig, cache_dir: str | None) -> SparseVolume | str:
    from ctsparse.sparsify import sparsify_cached

    try:
        sv, _hit = sparsify_cached(path, cfg, cache_dir=cache_dir)
        return sv
    except Exception as exc:
        return _error(path, exc)


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
    items = [(str(p), cfg, cache_dir) for p in paths]
    for i, result in enumerate(imap_isolated(_one, items, workers)):
        results[i] = result
        if progress:
            progress(i + 1, len(paths), str(paths[i]))
    return results


@dataclass(frozen=True)
class Prepared:
    """read_volume + sparsify of one scan, timed where it ran (a worker or the main process)."""

    sv: SparseVolume
    time_read_s: float
    time_preprocess_s: float
    peak_bytes: int  # peak RSS of the process that did the work, over read + sparsify


def read_and_sparsify(
    path: str,
    cfg: PreprocessConfig,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    files: Sequence[Path] | None = None,
) -> Prepared | str:
    from ctsparse.io import read_volume
    from ctsparse.meters import peak_memory
    from ctsparse.sparsify import read_spacing, sparsify

    try:
        with peak_memory() as mem:
            t0 = time.perf_counter()
            # resampled slice by slice while decoding (no full-resolution float volume in memory),
            # unless the blob filter runs on the scan's own grid
            volume = read_volume(
                path, series_uid=series_uid, allow_non_ct=allow_non_ct, spacing=read_spacing(cfg), files=files
            )
            t1 = time.perf_counter()
            sv = sparsify(volume, cfg)
            t2 = time.perf_counter()
            del volume
        return Prepared(sv, t1 - t0, t2 - t1, mem.peak_bytes)
    except Exception as exc:
        return _error(path, exc)


def iter_prepared(
    items: Sequence[InputItem], cfg: PreprocessConfig, workers: int = 0, allow_non_ct: bool = False
) -> Iterator[Prepared | str]:
    """read_and_sparsify over items (``ctsparse.inputs``), yielded in input order while workers
    run ahead."""
    jobs = [(str(it.path), cfg, it.series_uid, allow_non_ct, it.read_kwargs()["files"]) for it in items]
    if workers <= 0 or len(jobs) <= 1:
        for job in jobs:
            yield read_and_sparsify(*job)
        return
    yield from imap_isolated(read_and_sparsify, jobs, workers)
