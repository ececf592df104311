"""Short measurements on this device: one training step of the planned model on a real scan.

Steps run on a batch of BATCH copies of the representative scan: a step has fixed costs (kernel
maps, Python, the optimizer) that a batch of one or two scans would charge to the scan at several
times its share. Every figure is reported per scan.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ctsparse.config import ModelConfig, PreprocessConfig
from ctsparse.errors import CtsparseError
from ctsparse.plan.fingerprint import Fingerprint

REPEATS = 5  # timed steps per candidate after WARMUP steps; the median is kept
# The first steps are slower than the rest (allocator pools, first kernel maps, thread start-up):
# after one warm-up step the next was still up to 3x slower here.
WARMUP = 2
BATCH = 4
# A candidate whose warm-up step alone takes this long is timed once: the whole measurement must
# stay within about a minute on a 2-core CPU.
SLOW_STEP_S = 4.0
MAX_SECONDS = 60.0  # no further candidates are started after this


@dataclass(frozen=True)
class StepFigure:
    kernel: str
    patch_size: int
    sites: int  # of one scan
    channels: int
    step_s: float  # median forward + backward + optimizer step, per scan
    step_all_s: list[float]
    peak_bytes: int  # peak memory of one step above the memory in use before it, per scan


@dataclass(frozen=True)
class Measurements:
    device: str
    threads: int
    scan: str
    spacing: list[float] | None
    region: str
    memory_method: str
    seconds: float
    steps: list[StepFigure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def step(self, kernel: str, patch_size: int) -> StepFigure | None:
        for s in self.steps:
            if s.kernel == kernel and s.patch_size == patch_size:
                return s
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Measurements:
        return cls(**{**d, "steps": [StepFigure(**s) for s in d.get("steps", [])]})


@dataclass(frozen=True)
class Machine:
    """What make_plan needs to know about the device (read here, so that make_plan stays pure)."""

    device: str  # "cpu" or "cuda"
    memory_bytes: int  # total RAM, or the GPU's memory
    cpus: int = 1  # CPUs this process may run on
    ram_bytes: int = 8 << 30  # total RAM (where the preprocessing workers run)


def machine(device: str = "auto") -> Machine:
    from ctsparse.device import resolve_device

    dev = resolve_device(device, need_me=False)
    try:
        ram = int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    if dev.type == "cuda":
        import torch

        return Machine("cuda", int(torch.cuda.get_device_properties(dev).total_memory), cpus, ram)
    return Machine("cpu", ram, cpus, ram)


def representative_scan(fp: Fingerprint, region: str) -> str:
    """The scan whose site count in `region` is closest to the median (the first read scan if no
    sites were counted)."""
    counted = [(s.sites[region]["1"], s.path) for s in fp.scans if s.sites and region in s.sites]
    if not counted:
        return fp.scans[0].path
    median = statistics.median(n for n, _ in counted)
    return min(counted, key=lambda c: abs(c[0] - median))[1]


def measure_device(
    scan: str | Path,
    preprocess: PreprocessConfig,
    candidates: list[tuple[str, int]],
    device: str = "auto",
    model: ModelConfig | None = None,
    num_classes: int = 2,
    repeats: int = REPEATS,
) -> Measurements:
    """Time one training step (and its peak memory) for each (kernel, patch size) candidate.

    A candidate that cannot run here (e.g. the cross kernel on an unpatched MinkowskiEngine) is
    listed in `errors` instead of failing the whole measurement.
    """
    import torch

    from ctsparse.device import resolve_device
    from ctsparse.io import read_volume
    from ctsparse.models.registry import get_engine
    from ctsparse.sparsify import sparsify

    t_start = time.perf_counter()
    model_cfg = model or ModelConfig()
    dev = resolve_device(device, need_me=get_engine(model_cfg.backend).needs_me)
    vol = read_volume(scan, spacing=preprocess.spacing)
    steps: list[StepFigure] = []
    errors: list[str] = []
    method = "cuda" if dev.type == "cuda" else ""
    # in the order given: the first candidate gets the cleanest memory figure, later ones reuse
    # memory the allocator kept from it (their RSS peaks come out low)
    for k in dict.fromkeys(k for _, k in candidates):
        pre = replace(preprocess, features="patch" if k > 1 else "hu", patch_size=k)
        sv = sparsify(vol, pre)
        for kernel in dict.fromkeys(kn for kn, kk in candidates if kk == k):
            if time.perf_counter() - t_start > MAX_SECONDS:
                errors.append(f"{kernel} k={k}: not measured (the measurement time was spent)")
                continue
            try:
                fig, how = _measure_step(sv, replace(model_cfg, kernel=kernel), num_classes, dev, repeats)  # type: ignore[arg-type]
            except (CtsparseError, RuntimeError, MemoryError) as exc:
                errors.append(f"{kernel} k={k}: {str(exc).splitlines()[0][:200]}")
                continue
            method = how
            steps.append(replace(fig, patch_size=k))
    return Measurements(
        device=str(dev),
        threads=torch.get_num_threads(),
        scan=Path(scan).name,
        spacing=preprocess.spacing,
        region=preprocess.region,
        memory_method=method,
        seconds=round(time.perf_counter() - t_start, 2),
        steps=steps,
        errors=errors,
    )


def _measure_step(
    sv: Any, cfg: ModelConfig, num_classes: int, dev: Any, repeats: int
) -> tuple[StepFigure, str]:
    import torch

    from ctsparse.collate import collate
    from ctsparse.meters import peak_memory, release_freed_memory
    from ctsparse.models import create_model

    torch.manual_seed(0)
    model = create_model(cfg, sv.n_channels, num_classes).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = [i % num_classes for i in range(BATCH)]

    def step() -> None:
        batch = collate([sv] * BATCH, labels, cfg, dev)
        assert batch.labels is not None
        loss = torch.nn.functional.cross_entropy(model(batch.inputs), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # the warm-up step is also the memory probe: it includes the one-off allocations (optimizer
    # state, kernel maps, allocator pools), so the figure errs on the high side
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        peak, method = torch.cuda.max_memory_allocated(dev) - before, "cuda max_memory_allocated"
    else:
        release_freed_memory()  # else the second candidate reuses the first one's freed heap
        with peak_memory() as mem:
            step()
        peak, method = mem.delta_bytes, f"RSS ({mem.method})"
    first = time.perf_counter() - t0
    if first < SLOW_STEP_S:
        for _ in range(WARMUP - 1):
            step()
    times = []
    for _ in range(repeats if first < SLOW_STEP_S else 1):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) / BATCH)
    fig = StepFigure(
        kernel=cfg.kernel,
        patch_size=0,
        sites=sv.n_sites,
        channels=sv.n_channels,
        step_s=statistics.median(times),
        step_all_s=[round(t, 5) for t in times],
        peak_bytes=int(peak // BATCH),
    )
    return fig, method
