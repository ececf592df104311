"""Data-parallel training over torch.distributed: process group, sharding, reductions, SyncBN.

torchrun starts one process per device and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR/MASTER_PORT. Every rank runs the same train loop on its shard of each epoch; DDP
averages gradients, the helpers here sum the metric counters and gather validation outputs, and
only rank 0 writes files or emits events. Without those variables everything here is a no-op on
one process, so the single-process path is the same code.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ctsparse.device import resolve_device
from ctsparse.errors import CtsparseError


def dist_timeout() -> datetime.timedelta:
    """How long a rank waits in a collective: $CTSPARSE_DIST_TIMEOUT_MIN minutes, default 120.

    Preprocessing a large dataset happens between two collectives; torch's default 30 min would
    kill a run whose slowest rank is still decoding DICOM. Read when the group is created.
    """
    raw = os.environ.get("CTSPARSE_DIST_TIMEOUT_MIN", "120")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = math.nan
    if not minutes > 0:
        raise CtsparseError(f"CTSPARSE_DIST_TIMEOUT_MIN={raw!r}: expected a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job. Dist() is the single-process case."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    owns_group: bool = False  # we called init_process_group, so we destroy it
    comm_device: str = "cpu"  # gloo reduces CPU tensors, nccl CUDA tensors

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on one: stop decisions must be collective, else the
        ranks that go on wait forever in the next all_reduce of the ranks that stopped."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order (pickled: for small things like probabilities)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str, *, need_me: bool) -> tuple[Dist, torch.device]:
    """Join (or create from torchrun's variables) the process group; pick this rank's device.

    Backend gloo on CPU, nccl on CUDA; with CUDA each rank takes cuda:LOCAL_RANK.
    """
    if not dist.is_available() or not (dist.is_initialized() or launched_by_torchrun()):
        return Dist(), resolve_device(device, need_me=need_me)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    spec = device.strip().lower()
    if spec.startswith("cuda:"):
        raise CtsparseError(
            f"--device {device}: with several processes each rank takes cuda:LOCAL_RANK; "
            "pass --device cuda (or auto)"
        )
    dev = resolve_device(spec, need_me=need_me)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=dist_timeout())
        owns = True
    world = dist.get_world_size()
    info = Dist(
        rank=dist.get_rank(),
        world=world,
        local_rank=local_rank,
        local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        owns_group=owns,
        comm_device=str(dev) if dist.get_backend() == "nccl" else "cpu",
    )
    return info, dev


def cleanup(d: Dist, *, failed: bool = False) -> None:
    """Destroy the group we created. After a normal end all ranks first meet at a barrier: a
    rank tearing down gloo while a peer still uses its connections aborts the process."""
    if d.owns_group and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, d: Dist) -> int:
    """train.batch_size is the global batch: each rank takes its share (rounded up)."""
    return math.ceil(batch_size / d.world)


def shard(order: np.ndarray, d: Dist) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples of an epoch order, and their positions in the padded order.

    DistributedSampler semantics: the order is padded by wrapping around to a multiple of the
    world size (so every rank runs the same number of steps) and rank r takes positions
    r, r + W, r + 2W, ... With a per-rank batch of B/W, the union over ranks of step k is then
    exactly step k of a single process with batch B.
    """
    total = math.ceil(len(order) / d.world) * d.world
    positions = np.arange(total)[d.rank :: d.world]
    return order[positions % len(order)], positions


def steps_per_epoch(n: int, batch_size: int, d: Dist) -> int:
    return math.ceil(math.ceil(n / d.world) / per_rank_batch(batch_size, d))


def seed_rank(seed: int, d: Dist, epoch: int) -> None:
    """torch's generator (dropout) gets a stream of its own on each rank."""
    torch.manual_seed(int(np.random.SeedSequence([seed, d.rank, epoch]).generate_state(1)[0]))


def torch_rng_state(d: Dist) -> dict[str, Any]:
    """Every rank's torch generator state, for the checkpoint (a collective: all ranks call it)."""
    states = d.gather(torch.get_rng_state())
    return {"torch_rng": states[0], "torch_rng_ranks": states if d.enabled else []}


def restore_torch_rng(state: dict[str, Any], seed: int, d: Dist, epoch: int) -> None:
    ranks = state.get("torch_rng_ranks") or []
    if d.enabled and len(ranks) == d.world:
        torch.set_rng_state(ranks[d.rank])
    elif not d.enabled:
        torch.set_rng_state(state["torch_rng"])
    else:  # saved with another number of processes: fresh per-rank streams
        seed_rank(seed, d, epoch)


def wrap(model: nn.Module, d: Dist, dev: torch.device, *, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around the model (after SyncBN conversion); itself on one process."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        model = convert_sync_batchnorm(model, dev)
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def average_bn_buffers(model: nn.Module, d: Dist) -> None:
    """Average BatchNorm running statistics over ranks before evaluating or saving.

    With per-rank BN each rank's running mean/var saw only its own batches (and DDP's buffer
    broadcast makes them rank 0's at the next forward); the mean over ranks estimates the whole
    data. With SyncBN they are already equal and this changes nothing.
    """
    if not d.enabled:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                assert buf is not None
                t = buf.detach().to(d.comm_device, torch.float64)
                dist.all_reduce(t)
                buf.copy_((t / d.world).to(buf.device, buf.dtype))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all_reduce(SUM): the gradient of a sum over ranks is the sum of gradients.

    (torch.distributed.nn.functional.all_reduce does the same but aborts the process at exit
    with gloo on torch 2.13.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        g = grad.clone()
        dist.all_reduce(g)
        return g


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are over the whole global batch, on any backend.

    torch.nn.SyncBatchNorm (and ME's MinkowskiSyncBatchNorm, which wraps it) runs on CUDA only;
    this two-pass version (sum -> mean, centred sum of squares -> variance) works with gloo on
    the CPU, so two processes on half a batch each compute what one process computes on the
    whole batch. Parameter and buffer names are BatchNorm's, so checkpoints stay interchangeable.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=x.dtype, device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        mean = _AllReduceSum.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked.item())
                    if self.momentum is None
                    else float(self.momentum)
                )
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / max(n - 1, 1), m)  # unbiased, like BN
        return y


def convert_sync_batchnorm(module: nn.Module, dev: torch.device) -> nn.Module:
    """Every BatchNorm (including the BatchNorm1d inside ME.MinkowskiBatchNorm) -> a synced one.

    CUDA: torch.nn.SyncBatchNorm (fused kernels). Elsewhere: GlobalBatchNorm. The converted
    layers share the original parameters and buffers.
    """
    if dev.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, dev))
    return out
