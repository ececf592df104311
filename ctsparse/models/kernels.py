"""Kernel shapes, and a check that the installed MinkowskiEngine computes the cross kernel right.

MinkowskiEngine 0.5.4 as released enumerates a HYPER_CROSS region with the hypercube's first
`volume` offsets: a "3x3x3 cross" touches 7 corner-plane offsets of the cube and not even the
centre (src/kernel_region.hpp `coordinate_at`, "only for hypercube"; ME issue #436). The model
trains and runs anyway, so nothing fails loudly; it just is not the kernel it claims to be.
scripts/me-patches/0002-hyper-cross-kernel-offsets.patch fixes it in the build this project makes,
with the offset order below. `check_cross_kernel` refuses to build a cross model on an ME that
lacks the fix (installed some other way), and checkpoints record the order their weights follow.
"""

from __future__ import annotations

import functools
from typing import Any

from ctsparse.errors import CtsparseError

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


def _read_offsets(ME: Any, torch: Any) -> tuple[tuple[int, int, int], ...]:
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
        region_type=ME.RegionType.HYPER_CROSS,
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
