"""device.set_threads: one number for torch, ME's OpenMP loops and the BLAS behind ME's convolutions."""

from __future__ import annotations

import os

import pytest
import torch

ME = pytest.importorskip("MinkowskiEngine", reason="MinkowskiEngine is not installed: run scripts/setup.sh")


def _blas_pools() -> dict[str, int]:
    from threadpoolctl import threadpool_info

    return {p["filepath"]: p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


def test_set_threads_sizes_torch_openmp_and_the_blas_me_links() -> None:
    import MinkowskiEngineBackend._C as backend  # noqa: F401 - loads the OpenBLAS ME links

    from ctsparse.device import set_threads

    pools = _blas_pools()
    assert pools, "no BLAS loaded after importing MinkowskiEngine"
    before = torch.get_num_threads()
    try:
        set_threads(2)
        assert torch.get_num_threads() == 2
        assert set(_blas_pools().values()) == {2}
        assert os.environ["OPENBLAS_NUM_THREADS"] == "2"  # for a BLAS loaded later and for children
        set_threads(1)
        assert torch.get_num_threads() == 1
        assert set(_blas_pools().values()) == {1}
        assert os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        set_threads(before)
