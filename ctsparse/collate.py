"""SparseVolumes -> one network input for a batch of scans, in the form the model's engine takes
(an ME.SparseTensor for the sparse network, a padded dense grid for its twin: models/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ctsparse.config import ModelConfig
from ctsparse.models.registry import get_engine
from ctsparse.sparse_volume import SparseVolume


@dataclass
class Batch:
    inputs: Any  # whatever the engine's model takes (Engine.collate)
    labels: torch.Tensor | None
    n_sites: list[int]
    sources: list[str]


def collate(
    svs: Sequence[SparseVolume], labels: Sequence[int] | None, model: ModelConfig, device: torch.device
) -> Batch:
    inputs = get_engine(model.backend).inputs(svs, device, model)
    y = torch.tensor(list(labels), dtype=torch.long, device=device) if labels is not None else None
    return Batch(inputs, y, [sv.n_sites for sv in svs], [sv.source for sv in svs])
