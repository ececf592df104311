"""Everything about the installed MinkowskiEngine: version, CUDA build, threads, doctor's probes,
and the check that it computes the cross kernel right. Outside models/, ctsparse reaches ME only
through the engine registry (the sparse engine points here), so swapping or upgrading ME is a
change to this module and models/sparse.py.

The cross check: MinkowskiEngine 0.5.4 as released enumerates a HYPER_CROSS region with the
hypercube's first `volume` offsets: a "3x3x3 cross" touches 7 corner-plane offsets of the cube and
not even the centre (src/kernel_region.hpp `coordinate_at`, "only for hypercube"; ME issue #436).
The model trains and runs anyway, so nothing fails loudly; it just is not the kernel it claims to
be. scripts/me-patches/0002-hyper-cross-kernel-offsets.patch fixes it in the build this project
makes, with the offset order below. `check_cross_kernel` refuses to build a cross model on an ME
that lacks the fix (installed some other way), and checkpoints record the order their weights
follow.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ctsparse.errors import CtsparseError
from ctsparse.models.engine import Check

if TYPE_CHECKING:
    from ctsparse.config import ModelConfig

SETUP_HINT = "run `bash scripts/setup.sh` from the ctsparse checkout (builds and installs MinkowskiEngine)"
PATCH_HINT = "reinstall MinkowskiEngine with `python scripts/install_me.py` (applies scripts/me-patches)"

# ME kernel index -> (dx, dy, dz) of a size-3 cross in the patched build: the centre, then -1 and
# +1 along x, y and z
CROSS_OFFSETS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (-1, 0, 0),
    (1, 0, 0),
    (0, -1, 0),
    (0, 1, 0),
    (0, 0, -1),
    (0, 0, 1),
)
# Written into checkpoints of sparse cross models; a checkpoint without it was trained with the
# unpatched 0.5.4 cross, whose weights mean other offsets.
CROSS_ORDER = "centre,-x,+x,-y,+y,-z,+z"


@functools.cache
def cross_kernel_offsets() -> tuple[tuple[int, int, int], ...] | None:
    """The offsets the installed ME uses for a size-3 HYPER_CROSS, in kernel order (None if ME
    cannot be imported). Read off a kernel map on a 3x3x3 block: one site per offset."""
    try:
        import MinkowskiEngine as ME
        import torch
    except ImportError:
        return None
    threads = torch.get_num_threads()
    try:
        return _read_offsets(ME, torch)
    finally:
        # a coordinate manager sets OpenMP's thread count for the whole process: the one-thread
        # manager below would leave every later step (a cross model's training) on one core
        torch.set_num_threads(threads)


def _read_offsets(ME: Any, torch: Any, region: str = "HYPER_CROSS") -> tuple[tuple[int, int, int], ...]:
    """The offsets of a size-3 kernel of `region` in ME's kernel order, read off a real kernel map
    of a 3x3x3 block (empty if the map does not give each offset one input site)."""
    r = torch.arange(-1, 2)
    block = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(block), 1, dtype=torch.int64), block], 1).int()
    manager = ME.CoordinateManager(D=3, num_threads=1)
    x = ME.SparseTensor(torch.zeros(len(block), 1), coordinates=coords, coordinate_manager=manager)
    maps = manager.kernel_map(
        x.coordinate_map_key,
        x.coordinate_map_key,
        stride=1,
        kernel_size=3,
        region_type=getattr(ME.RegionType, region),
    )
    centre = int(((x.C[:, 1:] == 0).all(1)).nonzero()[0, 0])
    offsets: list[tuple[int, int, int]] = []
    for k in sorted(maps):
        pairs = maps[k]
        hit = pairs[0][pairs[1] == centre]  # the input site the centre output reads through offset k
        if hit.numel() != 1:
            return ()
        offsets.append((int(x.C[int(hit[0]), 1]), int(x.C[int(hit[0]), 2]), int(x.C[int(hit[0]), 3])))
    return tuple(offsets)


def check_cross_kernel() -> None:
    """Raise unless the installed ME computes the cross kernel this project expects."""
    got = cross_kernel_offsets()
    if got is not None and got != CROSS_OFFSETS:
        raise CtsparseError(
            "model.kernel: cross needs MinkowskiEngine built with ctsparse's patch (0.5.4 as released "
            f"computes a wrong cross kernel: offsets {list(got)}, ME issue #436); install it with "
            "`python scripts/install_me.py`, or use model.kernel: cube"
        )


def refuse_checkpoint(cfg: ModelConfig, checkpoint: Mapping[str, Any]) -> str | None:
    """Why the weights of a sparse checkpoint do not fit this build, or None."""
    order = (checkpoint.get("kernel_order") or {}).get("cross")
    if cfg.kernel == "cross" and order != CROSS_ORDER:
        return (
            "a cross-kernel model trained with MinkowskiEngine 0.5.4's unpatched cross kernel (its weights "
            "belong to other offsets, ME issue #436); retrain it with this build"
        )
    return None


def checkpoint_fields() -> dict[str, Any]:
    # which offset each cross-kernel weight belongs to; a checkpoint without it predates the patch
    return {"kernel_order": {"cross": CROSS_ORDER}}


def version() -> dict[str, str]:
    try:
        import MinkowskiEngine as ME
    except ImportError:
        return {}
    return {"MinkowskiEngine": str(ME.__version__)}


def has_cuda() -> bool:
    """Whether the installed ME was built with CUDA (False when ME cannot be imported)."""
    try:
        import MinkowskiEngine as ME
    except ImportError:
        return False
    return bool(ME.is_cuda_available())


def set_threads(n: int) -> None:
    """Make ME's coordinate managers use `n` OpenMP threads.

    Every coordinate manager (one per batch) sets OpenMP's thread count to ME's own CPU_COUNT, read
    once from $OMP_NUM_THREADS or os.cpu_count() when ME is imported: the caller sets the variable
    for an ME imported later (and child processes); this covers an ME already imported.
    """
    me = sys.modules.get("MinkowskiEngine")
    if me is not None:  # ME imports its modules as top-level names: find it by its class
        sys.modules[me.CoordinateManager.__module__].CPU_COUNT = n  # type: ignore[attr-defined]


def _linked_blas(so_path: str) -> str:
    """The BLAS a shared library links, read from ldd (e.g. 'libopenblas.so.0')."""
    try:
        out = subprocess.run(["ldd", so_path], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown (ldd unavailable)"
    libs = re.findall(r"^\s*(\S*(?:blas|mkl|atlas)\S*)\s+=>\s+(\S+)", out, re.MULTILINE)
    return ", ".join(f"{name} ({path})" for name, path in libs) or "none found by ldd"


def check_installed() -> list[Check]:
    """Doctor's probes of ME: import, build, linked BLAS, a smoke convolution, the cross kernel."""
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


def _cross_check() -> Check:
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
        PATCH_HINT,
    )
