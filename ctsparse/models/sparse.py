"""The sparse residual classifier on MinkowskiEngine.

ResNetBase pattern: variants differ only in widths, depths and kernel shape (configs/*.yaml).

    stem (k=stem_kernel) -> [stage_i: (downsample k=2, s=2 unless i == 0) -> depth_i residual blocks]
    -> global avg + max pooling -> dropout -> linear

Max pooling sits beside average pooling because the findings we classify (a nodule) are small and
local: averaging over ~10^5 sites dilutes them, the maximum keeps them.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
from torch import nn

from ctsparse.config import ModelConfig
from ctsparse.models.registry import register


def _kernel(cfg: ModelConfig, size: int, stride: int = 1) -> ME.KernelGenerator:
    # the stride-2 downsampling (size 2) is always a cube: a cross needs an odd size
    cross = cfg.kernel == "cross" and size % 2 == 1 and size > 1
    region = ME.RegionType.HYPER_CROSS if cross else ME.RegionType.HYPER_CUBE
    return ME.KernelGenerator(kernel_size=size, stride=stride, dimension=3, region_type=region)


def _conv(cfg: ModelConfig, cin: int, cout: int, size: int, stride: int = 1) -> ME.MinkowskiConvolution:
    return ME.MinkowskiConvolution(
        cin,
        cout,
        kernel_size=size,
        stride=stride,
        bias=False,
        kernel_generator=_kernel(cfg, size, stride),
        dimension=3,
    )


def _by_batch(pooled: ME.SparseTensor) -> torch.Tensor:
    """Global pooling returns one row per scan in ME's internal order, not by batch index."""
    return pooled.F[torch.argsort(pooled.C[:, 0].long())]


class SparseBasicBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(cfg, channels, channels, 3)
        self.norm1 = ME.MinkowskiBatchNorm(channels)
        self.conv2 = _conv(cfg, channels, channels, 3)
        self.norm2 = ME.MinkowskiBatchNorm(channels)
        self.relu = ME.MinkowskiReLU(inplace=True)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + x)


class SparseResNet(nn.Module):
    """Input: an ME.SparseTensor of a batch of scans. Output: logits (B, num_classes)."""

    backend = "sparse"

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        w = cfg.widths
        self.stem = nn.Sequential(
            _conv(cfg, in_channels, w[0], cfg.stem_kernel),
            ME.MinkowskiBatchNorm(w[0]),
            ME.MinkowskiReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        for i, (width, depth) in enumerate(zip(w, cfg.depths, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [
                    _conv(cfg, w[i - 1], width, 2, stride=2),
                    ME.MinkowskiBatchNorm(width),
                    ME.MinkowskiReLU(True),
                ]
            layers += [SparseBasicBlock(cfg, width) for _ in range(depth)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.avg_pool = ME.MinkowskiGlobalAvgPooling()
        self.max_pool = ME.MinkowskiGlobalMaxPooling()
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * w[-1], num_classes)
        self.num_features = 2 * w[-1]

    def forward_features(self, x: ME.SparseTensor) -> torch.Tensor:
        """Pooled embedding (B, 2 * widths[-1]), rows ordered by batch index."""
        x = self.stages(self.stem(x))
        return torch.cat([_by_batch(self.avg_pool(x)), _by_batch(self.max_pool(x))], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features))

    def forward(self, x: ME.SparseTensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register("sparse")
def build_sparse(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return SparseResNet(cfg, in_channels, num_classes)
