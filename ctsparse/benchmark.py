"""Sparse model against its dense twin, side by side: same input, same device, same threads.

For each case (a SparseVolume at some occupancy or spacing) both backends are built from the same
ModelConfig and timed in the same process, alternating, so machine noise hits both alike:
forward (median of N after warm-up, input construction included because a user pays for it),
one training step (forward + backward + AdamW step), and the memory of a forward pass.

Forward memory (``memory="subprocess"``, the default of ``ctsparse benchmark``): a fresh Python
process loads the case, builds the model and its input, then runs one no-gradient forward; the
figure is the rise of its RSS high-water mark (VmHWM reset just before the forward) over the RSS
just before it: activations, ME coordinate and kernel maps, dense im2col/oneDNN buffers. A fresh
process per case keeps the allocator's cache of earlier cases out of it. ``"inprocess"`` measures
the same rise in the benchmark's own process (quick, but freed memory of earlier cases that the
allocator keeps can hide part of it).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ctsparse.config import ModelConfig
from ctsparse.meters import peak_memory
from ctsparse.models.registry import get_engine
from ctsparse.sparse_volume import SparseVolume, load_sparse, save_sparse

Memory = Literal["subprocess", "inprocess"]
# The question a benchmark answers: this engine against that baseline, on the same input. Row
# columns are prefixed with the engine's name; speedup is baseline time / subject time.
SUBJECT, BASELINE = "sparse", "dense"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn: Callable[[], Any], runs: int, warmup: int, dev: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out


def median_seconds(fn: Callable[[], Any], runs: int, warmup: int = 1, dev: str = "cpu") -> float:
    """Median wall time of `runs` calls of fn after `warmup` calls (the benchmark scripts' timer)."""
    return statistics.median(_time(fn, runs, warmup, torch.device(dev)))


def _runner(
    model: torch.nn.Module, cfg: ModelConfig, sv: SparseVolume, dev: torch.device
) -> tuple[Callable[[], Any], Callable[[], Any]]:
    engine = get_engine(cfg.backend)

    def make() -> Any:
        return engine.inputs([sv], dev, cfg)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(1, dtype=torch.long, device=dev)

    @torch.no_grad()
    def forward() -> Any:
        model.eval()
        return model(make())

    def step() -> Any:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(make()), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return forward, step


def compare(
    sv: SparseVolume,
    model_cfg: ModelConfig,
    dev: torch.device,
    runs: int = 5,
    warmup: int = 1,
    train_step: bool = True,
    memory: Memory = "inprocess",
) -> dict[str, Any]:
    """Time and memory of SUBJECT and BASELINE on one input; an engine that fails (the dense grid
    does not fit in memory) gets its reason instead of figures."""
    multiple = get_engine(BASELINE).stride_multiple(model_cfg)
    grid = np.asarray(sv.grid_shape)
    dense_grid = (-(-grid // multiple) * multiple).tolist()
    row: dict[str, Any] = {
        "kernel": model_cfg.kernel,
        "sites": sv.n_sites,
        "occupancy": sv.occupancy,
        "grid": "x".join(map(str, sv.grid_shape)),
        "channels": sv.n_channels,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "memory_method": memory,
    }
    for backend in (SUBJECT, BASELINE):
        cfg = replace(model_cfg, backend=backend)
        torch.manual_seed(0)
        model = get_engine(backend).build(cfg, sv.n_channels, 2).to(dev)
        forward, step = _runner(model, cfg, sv, dev)
        try:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            if memory == "subprocess" and dev.type == "cpu":
                row.update({f"{backend}_{k}": v for k, v in forward_memory(sv, model_cfg, backend).items()})
            else:
                with peak_memory() as mem:
                    forward()
                row[f"{backend}_peak_rss_mb"] = mem.peak_bytes / 2**20
                row[f"{backend}_forward_mb"] = mem.delta_bytes / 2**20
            times = _time(forward, runs, warmup, dev)
            row[f"{backend}_forward_s"] = statistics.median(times)
            row[f"{backend}_forward_all_s"] = times
            if dev.type == "cuda":
                row[f"{backend}_peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            if train_step:
                row[f"{backend}_train_step_s"] = statistics.median(_time(step, max(1, runs // 2), 1, dev))
        except (RuntimeError, MemoryError) as exc:  # e.g. the dense grid does not fit in memory
            row[f"{backend}_error"] = str(exc).splitlines()[0][:200]
        del model, forward, step
    subject, baseline = row.get(f"{SUBJECT}_forward_s"), row.get(f"{BASELINE}_forward_s")
    if subject is not None and baseline is not None:
        row["speedup"] = baseline / subject
        # what the subject would take if its time scaled with the occupancy alone
        row["ideal_sparse_s"] = sv.occupancy * baseline
        row["sparse_over_ideal"] = subject / row["ideal_sparse_s"] if row["ideal_sparse_s"] else None
    row["dense_grid"] = "x".join(map(str, dense_grid))
    row["threads"] = torch.get_num_threads()  # after the runs: MinkowskiEngine may have changed it
    return row


def forward_memory(sv: SparseVolume, model_cfg: ModelConfig, backend: str) -> dict[str, Any]:
    """Memory of one no-gradient forward on the CPU, measured in a fresh process (module docstring).

    Returns forward_mb (the rise), peak_rss_mb (the child's high-water mark during the forward) and
    base_rss_mb (the child's RSS before it: interpreter, torch, ME, model and input).
    """
    with tempfile.TemporaryDirectory(prefix="ctsparse-bench-") as tmp:
        path = Path(tmp) / "case.npz"
        save_sparse(sv, path)
        spec = json.dumps({"npz": str(path), "model": dataclasses.asdict(model_cfg), "backend": backend,
                           "threads": torch.get_num_threads()})  # fmt: skip
        code = "import sys; from ctsparse.benchmark import memory_child; memory_child(sys.argv[1])"
        done = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory probe exited {done.returncode}: {tail}")
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def memory_child(spec_json: str) -> None:
    """Entry point of `forward_memory`'s subprocess: prints one JSON line."""
    spec = json.loads(spec_json)
    from ctsparse.device import set_threads

    set_threads(int(spec["threads"]))
    sv = load_sparse(spec["npz"])
    cfg = replace(ModelConfig(**spec["model"]), backend=spec["backend"])
    engine = get_engine(cfg.backend)
    torch.manual_seed(0)
    model = engine.build(cfg, sv.n_channels, 2).eval()
    x = engine.inputs([sv], torch.device("cpu"), cfg)
    with peak_memory() as mem, torch.no_grad():
        model(x)
    print(json.dumps({"forward_mb": mem.delta_bytes / 2**20, "peak_rss_mb": mem.peak_bytes / 2**20,
                      "base_rss_mb": mem.start_bytes / 2**20, "memory_probe": mem.method}))  # fmt: skip


def occupancy_summary(rows: list[dict[str, Any]], lo: float = 0.05, hi: float = 0.20) -> dict[str, Any]:
    """Per kernel and dense grid, over the rows with lo <= occupancy <= hi: median speed-up and
    sparse time / (occupancy x dense time). Grids are kept apart: a small grid's dense pass is
    dominated by fixed costs, which flatters the sparse side."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "speedup" in r and lo <= r["occupancy"] <= hi:
            groups.setdefault(f"{r['kernel']} kernel, dense grid {r['dense_grid']}", []).append(r)
    return {
        key: {
            "cases": [r["case"] for r in sel],
            "occupancy_range": [lo, hi],
            "median_speedup": statistics.median(r["speedup"] for r in sel),
            "median_sparse_over_ideal": statistics.median(r["sparse_over_ideal"] for r in sel),
        }
        for key, sel in sorted(groups.items())
    }


def layer_profile(
    sv: SparseVolume, model_cfg: ModelConfig, dev: torch.device, runs: int = 3
) -> dict[str, float]:
    """Where the sparse forward pass spends its time (medians over `runs`, seconds).

    tensor build = SparseTensor construction (coordinate hashing); kernel maps = first-pass minus
    cached-pass time of the convolutions (ME builds kernel maps lazily and caches them per
    coordinate manager); the rest is grouped by layer type through forward hooks.
    """
    cfg = replace(model_cfg, backend=SUBJECT)
    engine = get_engine(SUBJECT)
    model = engine.build(cfg, sv.n_channels, 2).to(dev).eval()
    groups: dict[str, list[float]] = {}
    starts: dict[int, float] = {}

    def group(m: torch.nn.Module) -> str:
        name = type(m).__name__
        if "Convolution" in name:
            return "convolutions"
        if "Norm" in name or "ReLU" in name:
            return "norm/activation"
        if "Pooling" in name:
            return "pooling"
        return "head"

    def pre(m: torch.nn.Module, _: Any) -> None:
        _sync(dev)
        starts[id(m)] = time.perf_counter()

    def post(m: torch.nn.Module, _: Any, __: Any) -> None:
        _sync(dev)
        current[group(m)] = current.get(group(m), 0.0) + time.perf_counter() - starts[id(m)]

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [h for m in leaves for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    current: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            x = engine.inputs([sv], dev, cfg)
            build = time.perf_counter() - t0
            current = {}
            model(x)
            first_conv = current.get("convolutions", 0.0)
            current = {}
            model(x)  # same coordinate manager: kernel maps are cached now
            cached = dict(current)
            cached["tensor build"] = build
            cached["kernel maps"] = max(0.0, first_conv - cached.get("convolutions", 0.0))
            for k, v in cached.items():
                groups.setdefault(k, []).append(v)
    for h in handles:
        h.remove()
    return {k: statistics.median(v[1:]) for k, v in groups.items()}
