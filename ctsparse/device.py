"""Device selection shared by train, predict and benchmark."""

from __future__ import annotations

import os

import torch

from ctsparse.errors import CtsparseError


def resolve_device(spec: str = "auto", *, need_me: bool = True) -> torch.device:
    """'auto' takes CUDA only when both torch and (for an engine on it) MinkowskiEngine have it.

    Args:
        spec: auto | cpu | cuda | cuda:N
        need_me: whether the model's engine runs on MinkowskiEngine (Engine.needs_me).
    """
    from ctsparse.models.minkowski import has_cuda as me_has_cuda

    spec = spec.strip().lower()
    cuda_ok = torch.cuda.is_available() and (not need_me or me_has_cuda())
    if spec == "auto":
        return torch.device("cuda:0" if cuda_ok else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CtsparseError(f"--device {spec}: torch sees no CUDA device (torch {torch.__version__})")
        if need_me and not me_has_cuda():
            raise CtsparseError(
                f"--device {spec}: MinkowskiEngine was built CPU-only; rebuild it with a CUDA torch "
                "and nvcc (bash scripts/setup.sh with CTSPARSE_TORCH set to a CUDA build)"
            )
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CtsparseError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return dev
    raise CtsparseError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")


# OpenBLAS's pool is kept at one thread unless the user set $OPENBLAS_NUM_THREADS before ctsparse
# started. More never helped ME's small per-offset GEMMs and its spinning pool threads fight torch's
# OpenMP threads for the cores: on an idle 2-core machine the sparse forward took 433 ms with
# torch and OpenBLAS both at 2 threads (the out-of-the-box setting) and 248 ms with OpenBLAS at 1
# (129 vs 39 ms with 4^3 patches; benchmarks/bench_blas_threads.py, results/blas_threads.json).
_USER_BLAS_THREADS = os.environ.get("OPENBLAS_NUM_THREADS")


def blas_threads() -> int:
    try:
        return max(1, int(_USER_BLAS_THREADS or 1))
    except ValueError:
        return 1


def configure_threads(n: int | None) -> None:
    """What train/predict/benchmark call first: `set_threads(n)` when --threads is given, else
    torch's own count for torch and ME's OpenMP, and the BLAS pool at `blas_threads()` all the same."""
    if n:
        set_threads(n)
    else:
        _size_blas()


def set_threads(n: int) -> None:
    """CPU threads for torch and MinkowskiEngine's OpenMP loops; its BLAS gets `blas_threads()`.

    torch.set_num_threads alone does not hold:
    - every ME coordinate manager (one per batch) sets OpenMP's thread count to ME's own CPU_COUNT,
      read once from $OMP_NUM_THREADS or os.cpu_count() when ME is imported. Setting the variable
      covers an ME imported later (and child processes); models.minkowski.set_threads covers an ME
      already imported.
    - ME's CPU convolution calls the system BLAS (OpenBLAS on Debian) once per kernel offset, and
      OpenBLAS keeps its own pthread pool of one thread per core, which neither torch nor OpenMP
      controls. Its GEMMs are small (channels x sites of one offset); on a machine whose other
      cores are busy each call waits for a descheduled pool thread, and one 3x3x3 convolution
      went from 8 ms to 330 ms (benchmarks/profile_conv.py). $OPENBLAS_NUM_THREADS covers a BLAS
      loaded later; threadpoolctl resizes one already loaded.
    """
    from ctsparse.models import minkowski

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    minkowski.set_threads(n)
    _size_blas()


def _size_blas() -> None:
    """BLAS pool at blas_threads(): the variable for a BLAS loaded later (and children), threadpoolctl
    for the ones loaded now."""
    os.environ["OPENBLAS_NUM_THREADS"] = str(blas_threads())
    limit_blas_threads(blas_threads())


def limit_blas_threads(n: int) -> None:
    """Resize the thread pools of every BLAS loaded in this process (OpenBLAS, MKL, BLIS)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
