"""The CPU sparse path's tensor and convolution layer, in torch ops.

`SiteTensor` is features on a `SiteSet` (models/sitemaps.py): the counterpart of ME.SparseTensor,
with the same `.F` (features), `.C` (batch and coordinates in input voxels) and `tensor_stride`.
`site_conv` is ME.MinkowskiConvolution's result on it, with ME's kernel tensor: the map comes from
the SiteSet (built once per coordinate set, shared by every layer on it), the arithmetic from
models/sitegemm.py (im2col GEMMs over row chunks, or per-offset pairs for sparse neighbourhoods).
The autograd function saves the input, the weight and the map, never a gathered copy.
"""

from __future__ import annotations

from typing import Any

import torch

from ctsparse.models import sitegemm
from ctsparse.models.sitemaps import KernelMap, Offsets, SiteSet, kernel_offsets, mirror

# Below this fraction of occupied (site, offset) slots a map runs as per-offset pairs (gather,
# GEMM, scatter-add) rather than im2col, whose GEMM also multiplies the zero rows of absent
# neighbours. The crossover rises with the channels, where the per-offset GEMMs run near full
# speed: measured forward + backward on random sites (16x16: 0.17) and on the phantom's stages
# (32x32: 0.6, 64x64: 0.75, 128x128: above 0.8), less on large maps, whose pair lists cost time
# to build (64x64 on 197 k sites at 0.70: im2col 1.47 s, pairs 1.65 s plus 0.2 s to list them).
# A multiplier for tests that force one path.
PAIR_DENSITY = 1.0


def _pairs_below(cin: int, cout: int) -> float:
    width = cin * cout
    base = 0.18 if width <= 256 else 0.55 if width <= 1024 else 0.65 if width <= 4096 else 0.85
    return base * PAIR_DENSITY


class SiteTensor:
    """Features (N, C) on a set of sites."""

    __slots__ = ("F", "sites")

    def __init__(self, features: torch.Tensor, sites: SiteSet) -> None:
        self.F = features
        self.sites = sites

    @property
    def C(self) -> torch.Tensor:
        """(N, 4) int32 batch, x, y, z in input voxels, as ME.SparseTensor.C."""
        c = self.sites.coords.clone()
        c[:, 1:] *= self.sites.stride
        return c

    @property
    def tensor_stride(self) -> list[int]:
        return [self.sites.stride] * 3

    def batch_index(self) -> torch.Tensor:
        return self.sites.coords[:, 0]

    def replace(self, features: torch.Tensor) -> SiteTensor:
        return SiteTensor(features, self.sites)

    def __add__(self, other: SiteTensor) -> SiteTensor:
        if other.sites is not self.sites:
            raise ValueError("adding features of two different site sets")
        return SiteTensor(self.F + other.F, self.sites)


def _use_pairs(kmap: KernelMap, weight: torch.Tensor) -> bool:
    return kmap.density < _pairs_below(weight.shape[1], weight.shape[2])


def _run(
    x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, pairs: bool, epilogue: sitegemm.Epilogue | None
) -> torch.Tensor:
    if pairs:
        return sitegemm.pairs_forward(x, kmap.pairs(), weight, kmap.table.shape[0], epilogue)
    return sitegemm.gather_gemm(x, kmap.table, weight, epilogue)


class MapConv(torch.autograd.Function):
    """A convolution along a KernelMap; saves the input, the weight and the map, nothing gathered.

    `flip` (a submanifold map's mirrored offsets) lets the im2col backward pass gather instead of
    scatter; None for the downsampling."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, flip: list[int] | None
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kmap, ctx.flip = kmap, flip
        ctx.pairs = _use_pairs(kmap, weight)
        return _run(x, weight, kmap, ctx.pairs, None)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        g = grad_out.contiguous()
        kmap: KernelMap = ctx.kmap
        if ctx.pairs:
            gx, gw = sitegemm.pairs_backward(x, kmap.pairs(), weight, g, need_x, need_w)
        elif ctx.flip is not None:
            gx, gw = sitegemm.submanifold_backward(x, kmap.table, weight, g, ctx.flip, need_x, need_w)
        else:
            gx = sitegemm.scatter_gemm(g, kmap.table, weight, x.shape[0]) if need_x else None
            gw = sitegemm.gather_weight_grad(x, kmap.table, g) if need_w else None
        return gx, gw, None, None


def site_conv(
    x: SiteTensor, weight: torch.Tensor, size: int, stride: int, cross: bool,
    epilogue: sitegemm.Epilogue | None = None,
) -> SiteTensor:  # fmt: skip
    """ME.MinkowskiConvolution's result on the CPU path: a submanifold convolution (stride 1, odd
    size, cube or cross) or the stride-2 size-2 downsampling; weight (K, cin, cout) in ME's order
    ((cin, cout) for size 1, as ME keeps it).

    With an epilogue (inference only: no autograd graph is built) the bias, residual and ReLU it
    holds are applied to the output chunk by chunk."""
    if weight.dim() == 2:
        weight = weight.unsqueeze(0)
    if stride == 1 and size % 2 == 1:
        offsets: Offsets = kernel_offsets(size, cross)
        flip = mirror(offsets)
        assert flip is not None  # odd cubes and crosses are symmetric
        sites, kmap = x.sites, x.sites.neighbours(offsets)
    elif stride == 2 and size == 2:
        flip = None
        sites, kmap = x.sites.downsampled()
    else:
        raise ValueError(f"the CPU sparse path has no convolution of size {size}, stride {stride}")
    if epilogue is not None:
        if torch.is_grad_enabled():
            raise RuntimeError("a fused convolution is for inference: it builds no autograd graph")
        return SiteTensor(_run(x.F, weight, kmap, _use_pairs(kmap, weight), epilogue), sites)
    return SiteTensor(MapConv.apply(x.F, weight, kmap, flip), sites)
