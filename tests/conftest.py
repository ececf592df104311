"""Shared fixtures: tiny real datasets written with the project's own phantom generator."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

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


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch and MinkowskiEngine on one CPU thread for the block, then as before.

    ME's CPU kernels give bitwise-identical results run to run only on one thread (see README,
    "Reproducibility"), and ME resets OpenMP's thread count itself (see device.set_threads).
    """
    import MinkowskiEngine as ME
    import torch

    from ctsparse.device import set_threads

    manager = sys.modules[ME.CoordinateManager.__module__]
    saved = (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), manager.CPU_COUNT)
    set_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]
        manager.CPU_COUNT = saved[2]


@pytest.fixture
def one_thread() -> Iterator[None]:
    with single_thread():
        yield
