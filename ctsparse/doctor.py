"""Environment report: Python, torch, MinkowskiEngine, BLAS, devices, threads.

`check_environment()` never raises: every probe becomes a Check with ok/detail/fix, so the CLI can
print the whole picture even when MinkowskiEngine is missing or broken.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SETUP_HINT = "run `bash scripts/setup.sh` from the ctsparse checkout (builds and installs MinkowskiEngine)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _linked_blas(so_path: str) -> str:
    """The BLAS a shared library links, read from ldd (e.g. 'libopenblas.so.0')."""
    try:
        out = subprocess.run(["ldd", so_path], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (ldd unavailable)"
    libs = re.findall(r"^\s*(\S*(?:blas|mkl|atlas)\S*)\s+=>\s+(\S+)", out, re.MULTILINE)
    return ", ".join(f"{name} ({path})" for name, path in libs) or "none found by ldd"


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


def _me_checks() -> list[Check]:
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import MinkowskiEngine as ME
            import MinkowskiEngineBackend._C as backend
    except Exception as exc:
        return [Check("MinkowskiEngine", False, f"cannot import: {str(exc).splitlines()[0]}", SETUP_HINT)]
    cuda = bool(ME.is_cuda_available())
    checks = [
        Check(
            "MinkowskiEngine",
            True,
            f"{ME.__version__} ({'CUDA ' + str(ME.cuda_version()) if cuda else 'CPU-only'} build)",
        ),
        Check("BLAS linked by ME", True, _linked_blas(str(backend.__file__))),
        _blas_pools(),
    ]
    try:
        import torch

        conv = ME.MinkowskiConvolution(2, 3, kernel_size=3, dimension=3)
        coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.int32)
        out = conv(ME.SparseTensor(torch.ones(3, 2), coordinates=coords))
        ok = out.F.shape == (3, 3) and bool(torch.isfinite(out.F).all())
        checks.append(
            Check("ME smoke convolution", ok, "3 sites, 2->3 channels" if ok else "wrong output", SETUP_HINT)
        )
    except Exception as exc:
        checks.append(Check("ME smoke convolution", False, f"failed: {str(exc).splitlines()[0]}", SETUP_HINT))
    checks.append(_cross_check())
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


def _cross_check() -> Check:
    from ctsparse.models.kernels import CROSS_OFFSETS, cross_kernel_offsets

    try:
        got = cross_kernel_offsets()
    except Exception as exc:
        return Check("ME cross kernel", False, f"failed: {str(exc).splitlines()[0]}", SETUP_HINT)
    if got == CROSS_OFFSETS:
        return Check("ME cross kernel", True, "centre + 6 face neighbours (ctsparse patch 0002)")
    return Check(
        "ME cross kernel",
        False,
        f"offsets {list(got or [])}: the unpatched 0.5.4 cross (ME issue #436); model.kernel: cross refuses",
        "reinstall MinkowskiEngine with `python scripts/install_me.py` (applies scripts/me-patches)",
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
    checks += _me_checks()
    for mod in ("numpy", "nibabel", "pydicom", "pylibjpeg"):
        try:
            version = str(getattr(__import__(mod), "__version__", "?"))
            checks.append(Check(mod, True, version))
        except Exception as exc:
            checks.append(Check(mod, False, f"cannot import: {exc}", SETUP_HINT))
    return checks
