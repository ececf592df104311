"""The dense twin: the sparse classifier's topology with torch.nn.Conv3d on the densified grid.

It exists so that every claim about sparse speed, memory and accuracy has a baseline measured on
the same data. A cross-shaped kernel is a 3x3x3 Conv3d whose weights outside the cross are held
at zero by a fixed mask, so both backends learn the same function class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
from torch import nn

from ctsparse.config import ModelConfig
from ctsparse.models.engine import Check, Engine, LastStage, SiteHooks
from ctsparse.models.pooled_norm import PooledNorm
from ctsparse.sparse_volume import SparseVolume


def _onednn_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()


class Conv3d(nn.Conv3d):
    """nn.Conv3d that on the CPU calls oneDNN directly, on channels-last tensors.

    PyTorch's dispatch sends a batch of one scan with fewer than 20,480 values in its first four
    dimensions (N x C x X x Y: the stem and the deeper, smaller stages) to the generic
    `slow_conv3d`, 3.5-19x slower than oneDNN on the same input; and oneDNN itself is 1.5-2x faster
    on channels-last than on contiguous tensors (benchmarks/bench_dense_conv.py). The dense twin
    is the baseline of every sparse claim, so it gets the fastest path PyTorch has. Same weights,
    same state_dict, same results as F.conv3d (tests/test_models.py).
    """

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if _onednn_ok(x) and isinstance(padding, tuple) and self.groups == 1 and self.padding_mode == "zeros":
            x = x.contiguous(memory_format=torch.channels_last_3d)
            return torch.mkldnn_convolution(
                x, weight, self.bias, padding, self.stride, self.dilation, self.groups
            )
        return self._conv_forward(x, weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight)


class MaskedConv3d(Conv3d):
    """Conv3d restricted to the 7-offset cross (centre plus the 6 face neighbours)."""

    mask: torch.Tensor

    def __init__(self, cin: int, cout: int, size: int) -> None:
        super().__init__(cin, cout, size, padding=size // 2, bias=False)
        mask = torch.zeros(1, 1, size, size, size)
        c = size // 2
        mask[..., :, c, c] = 1
        mask[..., c, :, c] = 1
        mask[..., c, c, :] = 1
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight * self.mask)


def _conv(cfg: ModelConfig, cin: int, cout: int, size: int) -> nn.Module:
    if cfg.kernel == "cross" and size > 1:
        return MaskedConv3d(cin, cout, size)
    return Conv3d(cin, cout, size, padding=size // 2, bias=False)


def _input_pool(x: torch.Tensor) -> torch.Tensor:
    """Per-scan mean and max of each input channel over the sites (the non-zero cells), as the
    sparse model's input pooling computes them; padding and empty cells are left out."""
    occupied = (x != 0).any(dim=1, keepdim=True)
    n = occupied.sum(dim=(2, 3, 4)).clamp_min(1)
    mean = (x * occupied).sum(dim=(2, 3, 4)) / n
    mx = x.masked_fill(~occupied, -torch.inf).amax(dim=(2, 3, 4))
    return torch.cat([mean, mx], dim=1)


class DenseBasicBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(cfg, channels, channels, 3)
        self.norm1 = nn.BatchNorm3d(channels)
        self.conv2 = _conv(cfg, channels, channels, 3)
        self.norm2 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + x)


class DenseResNet(nn.Module):
    """Input: (B, C, X, Y, Z) with zeros where the sparse model has no site. Output: logits."""

    backend = "dense"

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        w = cfg.widths
        self.stem = nn.Sequential(
            _conv(cfg, in_channels, w[0], cfg.stem_kernel), nn.BatchNorm3d(w[0]), nn.ReLU(True)
        )
        stages: list[nn.Module] = []
        for i, (width, depth) in enumerate(zip(w, cfg.depths, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [
                    Conv3d(w[i - 1], width, 2, stride=2, bias=False),
                    nn.BatchNorm3d(width),
                    nn.ReLU(True),
                ]
            layers += [DenseBasicBlock(cfg, width) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(cfg.dropout)
        self.input_norm = PooledNorm(2 * in_channels) if cfg.input_pooling else None
        self.num_features = 2 * w[-1] + (2 * in_channels if cfg.input_pooling else 0)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)), x)

    def pool(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The embedding from the last stage's output `y` (and the input `x`, for input pooling)."""
        feats = [y.mean(dim=(2, 3, 4)), y.amax(dim=(2, 3, 4))]
        if self.input_norm is not None:
            feats.append(self.input_norm(_input_pool(x)))
        return torch.cat(feats, dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_dense(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return DenseResNet(cfg, in_channels, num_classes)


def _last_stage(module: nn.Module, x: torch.Tensor, sv: SparseVolume) -> LastStage:
    model = cast(DenseResNet, module)
    y = model.stages(model.stem(x))  # in the caller's grad mode (engine.LastStage)
    channels, cells = y.shape[1], tuple(y.shape[2:])
    # every cell of the grid is a row, empty ones included: the twin pools over all of them
    leaf = y[0].reshape(channels, -1).T
    if not leaf.requires_grad:
        leaf = leaf.contiguous().requires_grad_(True)
    stride = x.shape[2] // cells[0]
    rows = np.ravel_multi_index(tuple((sv.coords // stride).T.astype(np.int64)), cells)
    pooled, x_pooled = None, x
    if model.input_norm is not None:
        # the input pooling reads a leaf of its own, the sites' rows scattered into an empty grid,
        # so that its gradient is the pooling's alone (the trunk's path reaches the input through x)
        at = torch.from_numpy(np.ravel_multi_index(tuple(sv.coords.T.astype(np.int64)), x.shape[2:]))
        at = at.to(x.device)
        flat = x.detach()[0].reshape(x.shape[1], -1)
        pooled = flat[:, at].T.contiguous().requires_grad_(True)
        x_pooled = torch.zeros_like(flat).index_copy(1, at, pooled.T).reshape(x.shape)

    def head(feats: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.pool(feats.T.reshape(1, channels, *cells), x_pooled))

    return LastStage(leaf, torch.from_numpy(rows).to(leaf.device), head, pooled)


def _input_sites(
    x: torch.Tensor, sv: SparseVolume
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    c = torch.from_numpy(sv.coords.astype(np.int64)).to(x.device)
    return x.requires_grad_(True), lambda t: t[0][:, c[:, 0], c[:, 1], c[:, 2]].T


def stride_multiple(cfg: ModelConfig) -> int:
    """Every stage after the first halves the grid: sizes divisible by 2^(stages-1) stay whole."""
    return int(2 ** (len(cfg.widths) - 1))


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


def check_installed() -> list[Check]:
    """The dense twin runs on torch alone; on the CPU its convolutions want oneDNN (Conv3d above)."""
    ok = torch.backends.mkldnn.is_available()
    return [
        Check(
            "dense twin (oneDNN)",
            True,
            "oneDNN convolutions on the CPU" if ok else "no oneDNN in this torch: slow_conv3d on the CPU",
        )
    ]


ENGINE = Engine(
    name="dense",
    build=build_dense,
    collate=collate_dense,
    stride_multiple=stride_multiple,
    check=check_installed,
    explain=SiteHooks(last_stage=_last_stage, input_sites=_input_sites),
)
