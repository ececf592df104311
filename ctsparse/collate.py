"""SparseVolumes -> one network input for a batch of scans, in the form the model's engine takes
(an ME.SparseTensor for the sparse network, a padded dense grid for its twin: models/)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ctsparse.candidates import expand
from ctsparse.config import ModelConfig
from ctsparse.data.augment import aligned, random_orientation
from ctsparse.models.registry import get_engine
from ctsparse.sparse_volume import SparseVolume


@dataclass
class Batch:
    inputs: Any  # whatever the engine's model takes (Engine.collate)
    labels: torch.Tensor | None
    # model.candidates: the class of each candidate ball (candidates.IGNORE: unknown), when
    # labels are given
    ball_labels: torch.Tensor | None
    n_sites: list[int]
    sources: list[str]


def collate(
    svs: Sequence[SparseVolume],
    labels: Sequence[int] | None,
    model: ModelConfig,
    device: torch.device,
    orient: np.random.Generator | None = None,
) -> Batch:
    """The batch for `model`'s engine. With model.candidates and labels, the candidate balls and
    their classes, each ball turned to a random orientation drawn from `orient` when given."""
    engine = get_engine(model.backend)
    y = torch.tensor(list(labels), dtype=torch.long, device=device) if labels is not None else None
    by_ball = None
    if model.candidates > 0 and labels is not None:
        balls, classes = expand(svs, model.candidates, labels, model.background)
        if orient is not None:
            balls = [random_orientation(b, orient) for b in balls]
        assert classes is not None
        per_ball = collate_balls(balls, classes, model, device)
        inputs, by_ball = per_ball.inputs, per_ball.labels
    else:
        inputs = engine.inputs(svs, device, model)
    return Batch(inputs, y, by_ball, [sv.n_sites for sv in svs], [sv.source for sv in svs])


def collate_balls(
    balls: Sequence[SparseVolume], labels: Sequence[int], model: ModelConfig, device: torch.device
) -> Batch:
    """Candidate balls as the network's per-ball input (model(inputs, per_ball=True)), each
    aligned on the network's strides (augment.aligned), with their classes as both the labels and
    the ball labels."""
    engine = get_engine(model.backend)
    y = torch.tensor(list(labels), dtype=torch.long, device=device)
    inputs = engine.collate([aligned(b) for b in balls], device, engine.stride_multiple(model))
    return Batch(inputs, y, y, [b.n_sites for b in balls], [b.source for b in balls])
