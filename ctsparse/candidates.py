"""Per-candidate classification: each candidate ball of a scan is one network input.

With `model.candidates: K`, a scan's sites (already cut down to the balls around its K strongest
blob maxima by the candidate stage, preprocess.blob_candidates) are split back into those K
balls. The network classifies every ball on its own, as the false-positive reduction stage of
lung-nodule CAD does, and the scan takes the logits of its most abnormal ball: the one whose
probability of the background class (the class of scans without findings) is lowest.

Training needs to know which balls hold a finding: DATA/findings.csv gives each finding's centre
and radius, `SparseVolume.marks` carries them in site coordinates through the augmentation, and a
ball is labelled with its scan's class when its centre lies within a finding's radius (plus half
a site), and with the background class otherwise. Balls of a scan of another class than the
background whose findings are unknown are left out of the loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from ctsparse.sparse_volume import SparseVolume
from ctsparse.sparsify import candidate_balls

if TYPE_CHECKING:
    import torch

IGNORE = -100  # torch's ignore_index: a ball whose class is not known
# Ball batches (train.balance "balls") hold one finding ball in this many: 1:3, as nodule CAD
# samples its candidates.
BALLS_PER_FINDING = 4


def own_balls(sv: SparseVolume, k: int) -> list[SparseVolume]:
    """The scan's candidate balls (up to k) as scans of their own, each in the scan's coordinates."""
    radius = float(sv.params.get("blob_candidate_mm", 12.0))
    rows = candidate_balls(sv.coords, sv.feats[:, -1], sv.spacing, k, radius)
    return [
        replace(sv, coords=np.ascontiguousarray(sv.coords[r]), feats=np.ascontiguousarray(sv.feats[r]))
        for r in rows
    ]


def split_balls(sv: SparseVolume, k: int) -> list[SparseVolume]:
    """The scan's k candidate balls, repeating the first when the scan has fewer maxima (a
    repeated ball changes no maximum)."""
    balls = own_balls(sv, k)
    return balls + [balls[0]] * (k - len(balls))


def ball_labels(sv: SparseVolume, balls: Sequence[SparseVolume], label: int, background: int) -> list[int]:
    """The class of each ball of `sv` (see the module docstring)."""
    if label == background:
        return [background] * len(balls)
    if sv.marks is None or not len(sv.marks):
        return [IGNORE] * len(balls)
    mm = np.asarray(sv.spacing)
    half_site = float(np.linalg.norm(mm)) / 2
    out = []
    for ball in balls:
        d = np.linalg.norm((sv.marks[:, :3] - ball.coords[0]) * mm, axis=1)
        out.append(label if bool(np.any(d <= sv.marks[:, 3] + half_site)) else background)
    return out


def expand(
    svs: Sequence[SparseVolume], k: int, labels: Sequence[int] | None = None, background: int = -1
) -> tuple[list[SparseVolume], list[int] | None]:
    """Every scan's k balls, scan after scan, and their classes when scan labels are given."""
    balls: list[SparseVolume] = []
    classes: list[int] | None = [] if labels is not None else None
    for i, sv in enumerate(svs):
        mine = split_balls(sv, k)
        balls += mine
        if classes is not None and labels is not None:
            classes += ball_labels(sv, mine, int(labels[i]), background)
    return balls, classes


def most_abnormal_ball(logits: torch.Tensor, k: int, background: int) -> torch.Tensor:
    """(B * k, C) ball logits -> (B,) index of each scan's ball with the lowest background
    probability (the highest log-odds of any other class against it)."""
    import torch

    z = logits.reshape(-1, k, logits.shape[1])
    others = torch.cat([z[..., :background], z[..., background + 1 :]], dim=2)
    return (torch.logsumexp(others, dim=2) - z[..., background]).argmax(dim=1)


def most_abnormal(logits: torch.Tensor, k: int, background: int) -> torch.Tensor:
    """(B * k, C) ball logits -> (B, C): the logits of each scan's most abnormal ball."""
    import torch

    z = logits.reshape(-1, k, logits.shape[1])
    return z[torch.arange(len(z), device=z.device), most_abnormal_ball(logits, k, background)]
