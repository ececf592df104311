"""A third engine, for tests: per-scan mean and max of the site features, then a linear head.

This module plus one `register(ENGINE)` is everything adding an engine takes: it knows nothing of
MinkowskiEngine or dense grids, and nothing outside models/ knows about it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ctsparse.config import ModelConfig
from ctsparse.models.engine import Check, Engine
from ctsparse.sparse_volume import SparseVolume

NAME = "pooled"
LAYOUT = {"pooled_layout": "mean,max"}
calls = {"collate": 0, "build": 0}


class PooledLinear(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * in_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    calls["build"] += 1
    return PooledLinear(cfg, in_channels, num_classes)


def collate(svs: Sequence[SparseVolume], device: torch.device, multiple: int) -> torch.Tensor:
    calls["collate"] += 1
    feats = [torch.from_numpy(sv.feats) for sv in svs]
    return torch.stack([torch.cat([f.mean(0), f.amax(0)]) for f in feats]).to(device)


def refuse(cfg: ModelConfig, checkpoint: Mapping[str, Any]) -> str | None:
    return None if checkpoint.get("pooled_layout") == LAYOUT["pooled_layout"] else "not a pooled checkpoint"


ENGINE = Engine(
    name=NAME,
    build=build,
    collate=collate,
    check=lambda: [Check("pooled engine", True, "torch only")],
    checkpoint_fields=lambda: dict(LAYOUT),
    refuse_checkpoint=refuse,
)
