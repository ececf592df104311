"""SparseVolumes -> one network input for a batch of scans (sparse tensor or padded dense grid)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctsparse.sparse import SparseVolume


@dataclass
class Batch:
    inputs: Any  # ME.SparseTensor for the sparse backend, (B, C, X, Y, Z) tensor for the dense twin
    labels: torch.Tensor | None
    n_sites: list[int]
    sources: list[str]


def batched_coordinates(svs: Sequence[SparseVolume]) -> np.ndarray:
    """(N, 4) int32 [batch, x, y, z], C-contiguous as ME requires."""
    parts = []
    for i, sv in enumerate(svs):
        col = np.full((sv.n_sites, 1), i, dtype=np.int32)
        parts.append(np.concatenate([col, sv.coords.astype(np.int32, copy=False)], axis=1))
    return np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.int32)


def collate_sparse(svs: Sequence[SparseVolume], device: torch.device) -> Any:
    import MinkowskiEngine as ME

    coords = torch.from_numpy(batched_coordinates(svs))
    feats = torch.from_numpy(np.ascontiguousarray(np.concatenate([sv.feats for sv in svs], axis=0)))
    # An explicit coordinate manager: ME's default one resets OpenMP to min(cpu_count, 20) threads
    # every time a tensor is built, silently undoing torch.set_num_threads / --threads.
    manager = ME.CoordinateManager(D=3, num_threads=torch.get_num_threads())
    return ME.SparseTensor(
        feats.to(device), coordinates=coords.to(device), device=str(device), coordinate_manager=manager
    )


def collate_dense(svs: Sequence[SparseVolume], device: torch.device, multiple: int = 1) -> torch.Tensor:
    """Zero-filled dense grids padded to the batch's largest shape, rounded up to `multiple`
    so that every stride-2 stage of the dense twin sees an even size."""
    shape = np.max([sv.grid_shape for sv in svs], axis=0)
    shape = (-(-shape // multiple) * multiple).astype(int)
    out = torch.zeros((len(svs), svs[0].n_channels, *shape.tolist()), dtype=torch.float32)
    for i, sv in enumerate(svs):
        c = torch.from_numpy(sv.coords.astype(np.int64))
        out[i, :, c[:, 0], c[:, 1], c[:, 2]] = torch.from_numpy(sv.feats).T
    return out.to(device)


def collate(
    svs: Sequence[SparseVolume],
    labels: Sequence[int] | None,
    backend: str,
    device: torch.device,
    multiple: int = 1,
) -> Batch:
    inputs = collate_sparse(svs, device) if backend == "sparse" else collate_dense(svs, device, multiple)
    y = torch.tensor(list(labels), dtype=torch.long, device=device) if labels is not None else None
    return Batch(inputs, y, [sv.n_sites for sv in svs], [sv.source for sv in svs])
