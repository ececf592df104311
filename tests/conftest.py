"""Shared fixtures: tiny real datasets written with the project's own phantom generator."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own SparseVolume cache, never the user's ~/.cache/ctsparse."""
    monkeypatch.setenv("CTSPARSE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 32x32x20 NIfTI phantoms (4 normal, 4 nodule) with labels.csv."""
    from ctsparse.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("tiny")
    generate_phantoms(root, 8, seed=3, shape=(32, 32, 20), spacing=(11.0, 11.0, 16.0), nodule_mm=(25.0, 35.0))
    return root


@pytest.fixture(autouse=True)
def _no_debug_leak() -> None:
    """`--debug` sets process-wide state; a test that used it must not change later tests."""
    from ctsparse.cli.console import State

    State.debug = False


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def preserved_threads() -> Iterator[None]:
    """Thread settings as they were when the block began: torch's count, the thread variables,
    every loaded BLAS/OpenMP pool (threadpoolctl) and MinkowskiEngine's CPU_COUNT.

    `--threads`, `configure_threads` and `set_threads` change all of them process-wide, and a
    test that leaves torch on one thread or OpenBLAS capped would slow or alter every later test.
    torch and ME are only looked at when already imported, so I/O tests stay light.
    """
    from threadpoolctl import ThreadpoolController

    torch = sys.modules.get("torch")
    me = sys.modules.get("MinkowskiEngine")
    manager = sys.modules[me.CoordinateManager.__module__] if me is not None else None
    env = {k: os.environ.get(k) for k in THREAD_VARS}
    n_torch = torch.get_num_threads() if torch is not None else None
    cpu_count = manager.CPU_COUNT if manager is not None else None
    pools = {(c.internal_api, c.filepath): c.num_threads for c in ThreadpoolController().lib_controllers}
    try:
        yield
    finally:
        if torch is not None and n_torch is not None:
            torch.set_num_threads(n_torch)
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if manager is not None:
            manager.CPU_COUNT = cpu_count
        for c in ThreadpoolController().lib_controllers:
            n = pools.get((c.internal_api, c.filepath))
            if n is not None and c.num_threads != n:
                c.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    """Every test ends with the thread settings it started with (see preserved_threads)."""
    with preserved_threads():
        yield


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch and MinkowskiEngine on one CPU thread for the block, then as before.

    ME's CPU kernels give bitwise-identical results run to run only on one thread (see
    docs/design.md, "Reproducibility"), and ME resets OpenMP's thread count itself (see
    device.set_threads).
    """
    import MinkowskiEngine  # noqa: F401 - so that preserved_threads saves its CPU_COUNT
    import torch  # noqa: F401

    from ctsparse.device import set_threads

    with preserved_threads():
        set_threads(1)
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a tiny sparse model trained for one epoch on `tiny_dataset` (about 15 s, once).

    It has its own cache folder: session fixtures run before the per-test cache fixture.
    """
    pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")
    from ctsparse.config import load_config
    from ctsparse.training.loop import train

    root = tmp_path_factory.mktemp("tiny_run")
    sets = ["model.widths=[8, 16]", "model.depths=[1, 1]", "preprocess.features=patch", "train.epochs=1"]
    train(
        tiny_dataset,
        root / "run",
        load_config(None, [*sets, f"data.cache_dir={root / 'cache'}"]),
        device="cpu",
    )
    return root / "run" / "best.pt"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Orthanc (HTTP + DICOM on free loopback ports, DICOMweb plugin) for the whole session;
    skipped with the reason when Orthanc is not installed."""
    from tests.orthanc import missing_reason, start_orthanc

    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()
