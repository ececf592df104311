"""Environment report: Python, torch, each engine's own probes (MinkowskiEngine for the sparse
one), BLAS, devices, threads.

`check_environment()` never raises: every probe becomes a Check with ok/detail/fix, so the CLI can
print the whole picture even when MinkowskiEngine is missing or broken.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from ctsparse.models.engine import Check

SETUP_HINT = "run `bash scripts/setup.sh` from the ctsparse checkout (builds and installs MinkowskiEngine)"


def _torch_checks() -> list[Check]:
    try:
        import torch
    except Exception as exc:
        return [Check("torch", False, f"cannot import: {exc}", SETUP_HINT)]
    checks = [Check("torch", True, f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")]
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n_gpu)]
    checks.append(Check("devices", True, "; ".join(devices)))
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    env_threads = {k: os.environ[k] for k in names if k in os.environ}
    checks.append(
        Check(
            "threads",
            True,
            f"torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}, "
            f"cpu count {os.cpu_count()}, env {env_threads or 'unset'}",
        )
    )
    return checks


def _engine_checks() -> list[Check]:
    """Each engine of the registry probes its own installation (models/: sparse -> ME)."""
    from ctsparse.models.registry import available, get_engine

    checks: list[Check] = []
    for name in available():
        try:
            engine = get_engine(name)
        except Exception as exc:  # e.g. sparse without MinkowskiEngine: reported, never raised
            detail = f"cannot import: {str(exc).splitlines()[0]}"
            checks.append(Check(f"{name} engine", False, detail, SETUP_HINT))
            continue
        checks += engine.check()
    return checks


def _blas_pools() -> Check:
    """Thread pools of the BLAS libraries loaded now (ME's convolutions call one per kernel offset;
    train/predict/benchmark resize them to device.blas_threads())."""
    try:
        from threadpoolctl import threadpool_info

        pools = [
            f"{p['internal_api']} {p['num_threads']} ({Path(p['filepath']).name})" for p in threadpool_info()
        ]
    except Exception as exc:
        return Check("BLAS thread pools", True, f"unknown ({str(exc).splitlines()[0]})")
    from ctsparse.device import blas_threads

    now = "; ".join(pools) or "none loaded"
    return Check(
        "BLAS thread pools", True, f"{now} (train/predict/benchmark run OpenBLAS at {blas_threads()})"
    )


def check_environment() -> list[Check]:
    checks = [
        Check(
            "python",
            sys.version_info >= (3, 10),
            f"{platform.python_version()} ({sys.executable})",
            "use Python >= 3.10",
        ),
        Check("platform", True, f"{platform.system()} {platform.machine()}"),
    ]
    checks += _torch_checks()
    checks += _engine_checks()
    checks.append(_blas_pools())  # after the engines: ME's convolutions load the BLAS it reports
    for mod in ("numpy", "nibabel", "pydicom", "pylibjpeg"):
        try:
            version = str(getattr(__import__(mod), "__version__", "?"))
            checks.append(Check(mod, True, version))
        except Exception as exc:
            checks.append(Check(mod, False, f"cannot import: {exc}", SETUP_HINT))
    return checks
