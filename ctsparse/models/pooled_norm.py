"""BatchNorm over per-scan pooled vectors that also accepts a training batch of one scan."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PooledNorm(nn.BatchNorm1d):
    """BatchNorm1d of (scans, features) vectors.

    The pooled input channels (model.input_pooling) have one value per scan, so a training batch
    of one scan (the last, partial batch of an epoch whose train set is one more than a multiple
    of the batch size) has no batch statistics: plain BatchNorm1d raises. Such a batch is
    normalised with the running statistics, which it leaves unchanged, as at evaluation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1 and self.running_mean is not None:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)
