"""device.set_threads / configure_threads: torch, ME's OpenMP loops and the BLAS behind ME's
convolutions, sized together."""

from __future__ import annotations

import os

import pytest
import torch

ME = pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")


def _blas_pools() -> dict[str, int]:
    from threadpoolctl import threadpool_info

    return {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


def test_threads_for_torch_openmp_and_the_blas_me_links() -> None:
    """torch and ME's OpenMP get N; the BLAS pool gets blas_threads() (1 unless the user set
    $OPENBLAS_NUM_THREADS: more made the sparse forward up to 3x slower,
    benchmarks/bench_blas_threads.py), also when --threads is not given."""
    import MinkowskiEngineBackend._C as backend  # noqa: F401 - loads the OpenBLAS ME links
    from threadpoolctl import threadpool_limits

    from ctsparse.device import _USER_BLAS_THREADS, blas_threads, configure_threads, set_threads

    assert _blas_pools(), "no BLAS loaded after importing MinkowskiEngine"
    assert blas_threads() == (int(_USER_BLAS_THREADS) if _USER_BLAS_THREADS else 1)
    before = torch.get_num_threads()
    try:
        set_threads(2)
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"
        assert set(_blas_pools().values()) == {blas_threads()}
        assert os.environ["OPENBLAS_NUM_THREADS"] == str(blas_threads())  # a later BLAS, children

        threadpool_limits(limits=2, user_api="blas")  # OpenBLAS's own default: one per core
        configure_threads(None)  # no --threads: torch keeps its count, the BLAS pool is reset
        assert torch.get_num_threads() == 2
        assert set(_blas_pools().values()) == {blas_threads()}
        configure_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        set_threads(before)


def test_preserved_threads_restores_what_a_test_changed() -> None:
    """The guard every test runs in (conftest._restore_threads): torch's count, the thread
    variables, ME's CPU_COUNT and the BLAS pools come back as they were."""
    import sys

    import MinkowskiEngineBackend._C as backend  # noqa: F401 - loads the OpenBLAS ME links
    from conftest import preserved_threads
    from threadpoolctl import threadpool_limits

    from ctsparse.device import set_threads

    manager = sys.modules[ME.CoordinateManager.__module__]
    with preserved_threads():  # the outer one puts back whatever this test found
        torch.set_num_threads(2)
        manager.CPU_COUNT = 2
        threadpool_limits(limits=2, user_api="blas")
        os.environ.pop("OMP_NUM_THREADS", None)
        os.environ["OPENBLAS_NUM_THREADS"] = "2"
        with preserved_threads():
            set_threads(1)  # what `--threads 1` does
            assert torch.get_num_threads() == 1 and set(_blas_pools().values()) == {1}
        assert torch.get_num_threads() == 2 and manager.CPU_COUNT == 2
        assert "OMP_NUM_THREADS" not in os.environ and os.environ["OPENBLAS_NUM_THREADS"] == "2"
        assert set(_blas_pools().values()) == {2}
