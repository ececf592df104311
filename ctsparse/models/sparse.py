"""The sparse residual classifier: MinkowskiEngine's layers, and ctsparse's CPU kernels.

ResNetBase pattern: variants differ only in widths, depths and kernel shape (configs/*.yaml).

    stem (k=stem_kernel) -> [stage_i: (downsample k=2, s=2 unless i == 0) -> depth_i residual blocks]
    -> global avg + max pooling -> dropout -> linear

Max pooling sits beside average pooling because the findings we classify (a nodule) are small and
local: averaging over ~10^5 sites dilutes them, the maximum keeps them.

Every layer is an ME layer that also takes a `SiteTensor` (models/siteconv.py): the input decides
the implementation. Engine `sparse` collates a SiteTensor for a CPU batch of CPU_KERNEL_MIN_SITES
sites or more, where ctsparse's torch kernels are faster than ME 0.5.4's CPU backend
(docs/benchmarks.md, "CPU sparse convolution against spconv"), and an ME.SparseTensor for a
smaller CPU batch (ME's C++ has less fixed cost per call) and on CUDA; engine `minkowski` always
collates for ME. Both run the same module with the same weights and state_dict keys, so a
checkpoint of one is a checkpoint of the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

import MinkowskiEngine as ME
import numpy as np
import torch
from torch import nn

from ctsparse.candidates import most_abnormal
from ctsparse.config import ModelConfig
from ctsparse.models import minkowski, sitegemm
from ctsparse.models.engine import Check, Engine, LastStage, SiteHooks
from ctsparse.models.pooled_norm import PooledNorm
from ctsparse.models.siteconv import SiteTensor, site_conv
from ctsparse.models.sitemaps import SiteSet
from ctsparse.sparse_volume import SparseVolume, rows_of

Sparse: TypeAlias = "ME.SparseTensor | SiteTensor"  # the input decides the implementation
# Sites in a CPU batch from which ctsparse's kernels beat ME's CPU backend, measured on compact
# blocks of a chest phantom, forward (eval) and training step, one thread, paired in one process
# (benchmarks/bench_engine_switch.py): the default network (cross kernel, 64 channels) ties at
# 6,000 sites (forward 7.5 ms on the kernels, 7.7 on ME) and the cube on 8 channels crosses between
# 3,000 and 6,000. Below it ME's C++ wins by its lower fixed cost per layer (4-6x at 100 sites);
# above it the kernels do (1.8-2.4x at 20,000 sites).
CPU_KERNEL_MIN_SITES = 6000


class Convolution(ME.MinkowskiConvolution):  # type: ignore[misc]
    """ME's convolution; on a SiteTensor, the same kernel tensor through models/siteconv."""

    def forward(self, input: Sparse, coordinates: Any = None) -> Sparse:
        if isinstance(input, SiteTensor):
            return self._on_sites(input, self.kernel)
        return super().forward(input, coordinates)

    def _on_sites(
        self, x: SiteTensor, kernel: torch.Tensor, epilogue: sitegemm.Epilogue | None = None
    ) -> SiteTensor:
        kg = self.kernel_generator
        cross = kg.region_type == ME.RegionType.HYPER_CROSS
        return site_conv(x, kernel, kg.kernel_size[0], kg.kernel_stride[0], cross, epilogue)

    def fused(
        self, x: SiteTensor, norm: BatchNorm, relu: bool, residual: SiteTensor | None = None
    ) -> SiteTensor:
        """relu(norm(self(x)) + residual) in one pass over the output, for inference: the batch
        norm's scale folded into the kernel, its shift, the residual and the ReLU applied to each
        chunk of output rows while it is in cache (models/sitegemm.Epilogue)."""
        scale, shift = norm.folded()
        extra = None if residual is None else residual.F
        return self._on_sites(x, self.kernel * scale, sitegemm.Epilogue(shift, extra, relu))


class BatchNorm(ME.MinkowskiBatchNorm):  # type: ignore[misc]
    def forward(self, input: Sparse) -> Sparse:
        if isinstance(input, SiteTensor):
            return input.replace(self.bn(input.F))
        return super().forward(input)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel: what this batch norm does in eval mode, x * scale + shift."""
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale = scale * bn.weight
            shift = shift * bn.weight + bn.bias
        return scale, shift

    def foldable(self) -> bool:
        return not self.bn.training and self.bn.running_mean is not None


def _inference(x: Sparse, *norms: BatchNorm) -> bool:
    """Whether the convolutions before `norms` may run fused (Convolution.fused): ctsparse's CPU
    kernels, no gradient wanted, every norm in eval mode with running statistics."""
    return isinstance(x, SiteTensor) and not torch.is_grad_enabled() and all(n.foldable() for n in norms)


class ReLU(ME.MinkowskiReLU):  # type: ignore[misc]
    def forward(self, input: Sparse) -> Sparse:
        if isinstance(input, SiteTensor):
            return input.replace(self.module(input.F))
        return super().forward(input)


def _kernel(cfg: ModelConfig, size: int, stride: int = 1) -> ME.KernelGenerator:
    # the stride-2 downsampling (size 2) is always a cube: a cross needs an odd size
    cross = cfg.kernel == "cross" and size % 2 == 1 and size > 1
    region = ME.RegionType.HYPER_CROSS if cross else ME.RegionType.HYPER_CUBE
    return ME.KernelGenerator(kernel_size=size, stride=stride, dimension=3, region_type=region)


def _conv(cfg: ModelConfig, cin: int, cout: int, size: int, stride: int = 1) -> Convolution:
    return Convolution(
        cin,
        cout,
        kernel_size=size,
        stride=stride,
        bias=False,
        kernel_generator=_kernel(cfg, size, stride),
        dimension=3,
    )


def global_avg_max(x: Sparse) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scan mean and max of the features, rows in batch-index order.

    Done in torch by batch index rather than with ME's MinkowskiGlobalAvg/MaxPooling: in ME 0.5.4's
    CPU build the average pooling writes its rows in the inverse of the batch order its output
    coordinates report (from about 4 scans per batch on, scans get other scans' averages, so the
    labels are effectively shuffled against the features), and the max pooling sends its gradient
    to the wrong sites for a batch of one scan (src/global_pooling_cpu.cpp). tests/test_models.py
    checks this function against a per-scan loop, forward and backward.
    """
    feats = x.F
    b = (x.sites.coords[:, 0] if isinstance(x, SiteTensor) else x.C[:, 0]).long().to(feats.device)
    n, c = int(b.max()) + 1, feats.shape[1]
    count = torch.bincount(b, minlength=n).clamp_min(1).unsqueeze(1).to(feats.dtype)
    avg = torch.zeros(n, c, dtype=feats.dtype, device=feats.device).index_add(0, b, feats) / count
    mx = torch.full((n, c), -torch.inf, dtype=feats.dtype, device=feats.device).scatter_reduce(
        0, b.unsqueeze(1).expand_as(feats), feats, "amax", include_self=False
    )
    return avg, mx


class SparseBasicBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(cfg, channels, channels, 3)
        self.norm1 = BatchNorm(channels)
        self.conv2 = _conv(cfg, channels, channels, 3)
        self.norm2 = BatchNorm(channels)
        self.relu = ReLU(inplace=True)

    def forward(self, x: Sparse) -> Sparse:
        if _inference(x, self.norm1, self.norm2):
            assert isinstance(x, SiteTensor)
            out = self.conv1.fused(x, self.norm1, relu=True)
            return self.conv2.fused(out, self.norm2, relu=True, residual=x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + x)


class Stage(nn.Sequential):
    """nn.Sequential (same state_dict keys) whose convolution, batch norm, ReLU runs run fused on
    ctsparse's CPU kernels at inference (Convolution.fused)."""

    def forward(self, x: Sparse) -> Sparse:
        layers = list(self)
        i = 0
        while i < len(layers):
            conv, rest = layers[i], layers[i + 1 : i + 3]
            if (
                isinstance(conv, Convolution)
                and len(rest) == 2
                and isinstance(rest[0], BatchNorm)
                and isinstance(rest[1], ReLU)
                and _inference(x, rest[0])
            ):
                assert isinstance(x, SiteTensor)
                x = conv.fused(x, rest[0], relu=True)
                i += 3
            else:
                x = conv(x)
                i += 1
        return x


class SparseResNet(nn.Module):
    """Input: an ME.SparseTensor or a SiteTensor of a batch of scans. Output: logits (B, num_classes)."""

    backend = "sparse"

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if cfg.kernel == "cross":
            minkowski.check_cross_kernel()
        w = cfg.widths
        self.stem = Stage(
            _conv(cfg, in_channels, w[0], cfg.stem_kernel),
            BatchNorm(w[0]),
            ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        for i, (width, depth) in enumerate(zip(w, cfg.depths, strict=True)):
            layers: list[nn.Module] = []
            if i > 0:
                layers += [
                    _conv(cfg, w[i - 1], width, 2, stride=2),
                    BatchNorm(width),
                    ReLU(True),
                ]
            layers += [SparseBasicBlock(cfg, width) for _ in range(depth)]
            stages.append(Stage(*layers))
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(cfg.dropout)
        self.input_norm = PooledNorm(2 * in_channels) if cfg.input_pooling else None
        self.num_features = 2 * w[-1] + (2 * in_channels if cfg.input_pooling else 0)
        self.head = nn.Linear(self.num_features, num_classes)
        self.candidates, self.background = cfg.candidates, cfg.background

    def forward_features(self, x: Sparse) -> torch.Tensor:
        """Pooled embedding (B, 2 * widths[-1]), rows ordered by batch index."""
        return self.pool(self.stages(self.stem(x)), x)

    def pool(self, y: Sparse, x: Sparse) -> torch.Tensor:
        """The embedding from the last stage's output `y` (and the input `x`, for input pooling)."""
        avg, mx = global_avg_max(y)
        if self.input_norm is None:
            return torch.cat([avg, mx], dim=1)
        return torch.cat([avg, mx, self.input_norm(torch.cat(global_avg_max(x), dim=1))], dim=1)

    def forward_head(self, features: torch.Tensor, per_ball: bool = False) -> torch.Tensor:
        """Logits per scan; with model.candidates, the scan's most abnormal ball's (per_ball:
        every ball's, rows as in the input)."""
        logits = self.head(self.dropout(features))
        if self.candidates and not per_ball:
            return most_abnormal(logits, self.candidates, self.background)
        return logits

    def forward(self, x: Sparse, per_ball: bool = False) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), per_ball)


def batched_coordinates(svs: Sequence[SparseVolume]) -> np.ndarray:
    """(N, 4) int32 [batch, x, y, z], C-contiguous as ME requires."""
    out = np.empty((sum(sv.n_sites for sv in svs), 4), dtype=np.int32)
    start = 0
    for i, sv in enumerate(svs):  # written in place: no per-scan parts to concatenate
        end = start + sv.n_sites
        out[start:end, 0] = i
        out[start:end, 1:] = sv.coords
        start = end
    return out


def collate_sparse(svs: Sequence[SparseVolume], device: torch.device, multiple: int = 1) -> Sparse:
    """Engine `sparse`: a SiteTensor for a CPU batch of CPU_KERNEL_MIN_SITES sites or more
    (ctsparse's kernels), an ME.SparseTensor for a smaller one and on CUDA."""
    if device.type == "cpu" and sum(sv.n_sites for sv in svs) >= CPU_KERNEL_MIN_SITES:
        return collate_sites(svs)
    return collate_minkowski(svs, device, multiple)


def _features(svs: Sequence[SparseVolume]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.concatenate([sv.feats for sv in svs], axis=0)))


def collate_sites(svs: Sequence[SparseVolume]) -> SiteTensor:
    """One SiteTensor for a batch of scans, rows in input order (a fresh SiteSet: no maps yet).
    The features sit on a zero row, which the first convolution reads for a missing neighbour."""
    feats = sitegemm.padded_empty(sum(sv.n_sites for sv in svs), svs[0].feats.shape[1], torch.empty(0))
    np.concatenate([sv.feats for sv in svs], axis=0, out=feats.numpy())
    return SiteTensor(feats, SiteSet(torch.from_numpy(batched_coordinates(svs))))


def collate_minkowski(
    svs: Sequence[SparseVolume], device: torch.device, multiple: int = 1
) -> ME.SparseTensor:
    """One ME.SparseTensor for a batch of scans (`multiple` is unused: any grid will do)."""
    coords = torch.from_numpy(batched_coordinates(svs))
    feats = _features(svs)
    # An explicit coordinate manager: ME's default one resets OpenMP to min(cpu_count, 20) threads
    # every time a tensor is built, silently undoing torch.set_num_threads / --threads.
    manager = ME.CoordinateManager(D=3, num_threads=torch.get_num_threads())
    return ME.SparseTensor(
        feats.to(device), coordinates=coords.to(device), device=str(device), coordinate_manager=manager
    )


def build_sparse(cfg: ModelConfig, in_channels: int, num_classes: int) -> nn.Module:
    return SparseResNet(cfg, in_channels, num_classes)


def _last_stage(module: nn.Module, x: Sparse, sv: SparseVolume) -> LastStage:
    model = cast(SparseResNet, module)
    y = model.stages(model.stem(x))  # in the caller's grad mode (engine.LastStage)
    leaf = y.F if y.F.requires_grad else y.F.detach().requires_grad_(True)
    # ME keeps coordinates in input units: the cell covering a site is the site floored to the stride
    stride = np.asarray(y.tensor_stride, dtype=np.int64)
    covering = sv.coords.astype(np.int64) // stride * stride
    rows = rows_of(y.C[:, 1:].cpu().numpy().astype(np.int64), covering)
    pooled, x_pooled = None, x
    if model.input_norm is not None:
        # the input pooling reads a leaf of its own, in site order, so that its gradient is the
        # pooling's alone (the trunk's path reaches the input through x)
        site_row = _site_rows(x, sv).to(x.F.device)
        pooled = x.F.detach()[site_row].requires_grad_(True)
        row_site = torch.empty_like(site_row)
        row_site[site_row] = torch.arange(len(site_row), device=site_row.device)
        x_pooled = _with_features(x, pooled[row_site])

    def head(feats: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.pool(_with_features(y, feats), x_pooled))

    return LastStage(leaf, torch.from_numpy(rows).to(leaf.device), head, pooled)


def _with_features(x: Sparse, feats: torch.Tensor) -> Sparse:
    """`x` with other features, rows in x's order (same coordinates, same kernel maps)."""
    if isinstance(x, SiteTensor):
        return x.replace(feats)
    return ME.SparseTensor(
        feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
    )


def _site_rows(x: Sparse, sv: SparseVolume) -> torch.Tensor:
    """For each site of `sv` (its order) the row of the input `x` that holds it."""
    return torch.from_numpy(rows_of(x.C[:, 1:].cpu().numpy().astype(np.int64), sv.coords.astype(np.int64)))


def _input_sites(x: Sparse, sv: SparseVolume) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    rows = _site_rows(x, sv)
    leaf = x.F.requires_grad_(True)
    return leaf, lambda t: t[rows.to(t.device)]


def check_cpu_kernels() -> list[Check]:
    """ME's probes, then ctsparse's CPU kernels against ME's convolution on a small input."""
    checks = minkowski.check_installed()
    try:
        coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0], [1, 2, 0, 0]], dtype=torch.int32)
        feats = torch.arange(8.0).view(4, 2)
        conv = Convolution(2, 3, kernel_size=3, dimension=3, bias=False)
        manager = ME.CoordinateManager(D=3, num_threads=torch.get_num_threads())
        with torch.no_grad():
            ours = conv(SiteTensor(feats, SiteSet(coords)))
            theirs = conv(ME.SparseTensor(feats, coordinates=coords, coordinate_manager=manager))
        ok = bool(torch.allclose(_by_site(ours), _by_site(theirs), atol=1e-5))
        detail = "equal ME's convolution on a smoke input" if ok else "differ from ME's convolution"
    except Exception as exc:
        ok, detail = False, f"failed: {str(exc).splitlines()[0]}"
    return [*checks, Check("ctsparse CPU kernels", ok, detail, "" if ok else "report this as a bug")]


def _by_site(x: Sparse) -> torch.Tensor:
    """Features in the order of their (batch, x, y, z): ME keeps rows in an order of its own."""
    c = x.C.long()
    return x.F[torch.argsort(((c[:, 0] * 1024 + c[:, 1]) * 1024 + c[:, 2]) * 1024 + c[:, 3])]


def _check_minkowski() -> list[Check]:
    return [Check("minkowski engine", True, "the sparse network on MinkowskiEngine on every device")]


def _on_minkowski(device: torch.device) -> str:
    return f"MinkowskiEngine {ME.__version__} ({device.type})"


def _auto(device: torch.device) -> str:
    if device.type != "cpu":
        return _on_minkowski(device)
    return (
        f"ctsparse CPU kernels (torch) for batches of {CPU_KERNEL_MIN_SITES:,} sites or more, "
        f"MinkowskiEngine {ME.__version__} (cpu) for smaller ones"
    )


# The sparse network, on ctsparse's kernels for large CPU batches and on MinkowskiEngine elsewhere
ENGINE = Engine(
    name="sparse",
    build=build_sparse,
    collate=collate_sparse,
    needs_me=True,
    check=check_cpu_kernels,
    versions=minkowski.version,
    checkpoint_fields=minkowski.checkpoint_fields,
    refuse_checkpoint=minkowski.refuse_checkpoint,
    explain=SiteHooks(last_stage=_last_stage, input_sites=_input_sites),
    implementation=_auto,
)
# The same network on MinkowskiEngine everywhere, its CPU backend included (what `sparse` ran on
# the CPU before ctsparse had kernels of its own): for comparisons, and as a fallback
MINKOWSKI = dataclasses.replace(
    ENGINE, name="minkowski", collate=collate_minkowski, check=_check_minkowski, implementation=_on_minkowski
)
