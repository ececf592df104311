"""CPU sparse convolution against spconv: ctsparse's kernels, MinkowskiEngine 0.5.4 and spconv 2.3.8.

    python benchmarks/bench_spconv.py [--occupancies 5,12,20,35] [--runs 5] [--threads 1,2]
        [--tasks conv16,conv64,forward,train] [--engines spconv,minkowski,ctsparse,dense]
        [--kernel cube|cross] [--grid 128,128,100] [--channels 8] [--json benchmarks/results/spconv.json]

(--json also writes the Markdown table of docs/benchmarks.md beside it, as .md.)

Inputs are CT-like: the benchmark phantom rendered on a 128x128x100 grid (2.73 x 2.73 x 3.2 mm,
what a 256x256x200 scan becomes in 2^3 patches), keeping the voxels above the HU quantile that
leaves the wanted occupancy (bone first, then soft tissue), with 8 random input channels.

Tasks, each timed in its own process per engine, the engines taking turns run by run (so that load
from outside falls on all alike; median of --runs after one warm-up run; every run builds its
input from the raw coordinates, so kernel maps are built each time, never cached):
- conv16, conv64: one 3x3x3 submanifold convolution C -> C, map build included;
- forward, train: ctsparse's classifier (stem, stages 16/32/64/128 with a stride-2 k=2
  downsampling and one basic block each, global avg + max pooling, linear; cube kernel, or with
  --kernel cross the 7-offset cross, which spconv lacks), a batch of one scan: a no-gradient
  forward, and forward + backward.
Engines: `ctsparse` (engine `sparse` on the CPU: models/siteconv), `minkowski` (the same model on
ME 0.5.4's CPU backend), `spconv` (the same network built from spconv 2.3.8's SubMConv3d /
SparseConv3d, run in a side virtual environment) and `dense` (the dense twin on oneDNN, for the
ideal: occupancy x dense time). Memory: the rise of the RSS high-water mark over one run, in a
fresh process whose allocator returns freed blocks. --keep-freed times every engine with glibc
keeping freed memory for reuse (the default allocator unmaps every freed block above its mmap
threshold, and the next tensor that size page-faults again: the dense twin's large activations
pay most).

spconv (with cumm) and torch==2.13.0 are installed into --venv (default
~/.cache/ctsparse/spconv-venv) on first use: a benchmark-only dependency, never ctsparse's. Its
backward pass calls torch.cuda.current_stream() unconditionally, which raises on a CPU-only torch;
the worker patches that call to the null stream.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

GRID = (128, 128, 100)
FIELD_MM = (350.0, 350.0, 320.0)  # the benchmark phantom's field of view
CHANNELS = 8
WIDTHS = [16, 32, 64, 128]
ENGINES = ["spconv", "minkowski", "ctsparse", "dense"]
DEFAULT_VENV = Path.home() / ".cache" / "ctsparse" / "spconv-venv"


# ---------------------------------------------------------------- the worker (one task, one engine)


def _peak_rise(fn: Callable[[], Any]) -> float:
    """MiB the RSS high-water mark rises over one call (VmHWM reset through clear_refs)."""

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    fn()
    return (status("VmHWM:") - before) / 2**20


def _spconv_task(task: str, coords: Any, feats: Any, grid: list[int]) -> Callable[[], Any]:
    import spconv.pytorch as spconv
    import torch
    from spconv.pytorch import ops
    from torch import nn

    ops.get_current_stream = lambda: 0  # the backward pass asks CUDA for a stream even on the CPU
    idx = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1).contiguous()

    def tensor(f: Any) -> Any:
        return spconv.SparseConvTensor(f, idx, grid, 1)

    if task.startswith("conv"):
        c = int(task[4:])
        conv = spconv.SubMConv3d(c, c, 3, bias=False)
        x = torch.randn(len(coords), c)
        return lambda: conv(tensor(x))

    class Block(spconv.SparseModule):  # type: ignore[misc]  # SparseSequential hands it the tensor
        def __init__(self, c: int, key: str) -> None:
            super().__init__()
            self.conv1 = spconv.SubMConv3d(c, c, 3, bias=False, indice_key=key)
            self.conv2 = spconv.SubMConv3d(c, c, 3, bias=False, indice_key=key)
            self.norm1, self.norm2 = nn.BatchNorm1d(c), nn.BatchNorm1d(c)

        def forward(self, x: Any) -> Any:
            out = self.conv1(x)
            out = out.replace_feature(torch.relu(self.norm1(out.features)))
            out = self.conv2(out)
            return out.replace_feature(torch.relu(self.norm2(out.features) + x.features))

    layers: list[nn.Module] = [spconv.SubMConv3d(feats.shape[1], WIDTHS[0], 3, bias=False, indice_key="s0")]
    layers += [spconv.SparseSequential(nn.BatchNorm1d(WIDTHS[0]), nn.ReLU()), Block(WIDTHS[0], "s0")]
    for i in range(1, len(WIDTHS)):
        layers += [spconv.SparseConv3d(WIDTHS[i - 1], WIDTHS[i], 2, stride=2, bias=False, indice_key=f"d{i}")]
        layers += [spconv.SparseSequential(nn.BatchNorm1d(WIDTHS[i]), nn.ReLU()), Block(WIDTHS[i], f"s{i}")]
    trunk = spconv.SparseSequential(*layers)
    head = nn.Linear(2 * WIDTHS[-1], 2)

    def model(x: Any) -> Any:
        y = trunk(x)
        f = y.features  # one scan: global pooling over all rows
        return head(torch.cat([f.mean(0), f.amax(0)])[None])

    return _network(task, model, [trunk, head], lambda: tensor(feats))


def _ctsparse_task(spec: dict[str, Any], coords: Any, feats: Any) -> Callable[[], Any]:
    from dataclasses import replace

    import torch

    from ctsparse.collate import collate
    from ctsparse.config import ModelConfig
    from ctsparse.models import create_model
    from ctsparse.sparse_volume import SparseVolume

    task, grid = spec["task"], tuple(spec["grid"])
    backend = {"ctsparse": "sparse", "minkowski": "minkowski", "dense": "dense"}[spec["engine"]]
    cfg = ModelConfig(backend=backend, widths=WIDTHS, depths=[1] * len(WIDTHS), kernel=spec["kernel"])
    cpu = torch.device("cpu")
    if task.startswith("conv"):
        c = int(task[4:])
        cfg = replace(cfg, widths=[c], depths=[1])
        sv = SparseVolume(coords.numpy(), torch.randn(len(coords), c).numpy(), grid, np.eye(4), {})
        net = create_model(cfg, c, 2)
        conv = net.stages[0][0].conv1  # a 3x3x3 C -> C convolution of the engine's network
        return lambda: conv(collate([sv], None, cfg, cpu).inputs)
    sv = SparseVolume(coords.numpy(), feats.numpy(), grid, np.eye(4), {})
    model = create_model(cfg, feats.shape[1], 2)
    return _network(task, model, [model], lambda: collate([sv], None, cfg, cpu).inputs)


def _network(
    task: str, model: Callable[[Any], Any], modules: list[Any], make: Callable[[], Any]
) -> Callable[[], Any]:
    import torch

    for m in modules:
        m.train(task == "train")
    if task == "forward":
        return lambda: model(make())

    def step() -> None:
        for m in modules:
            m.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(make()), torch.zeros(1, dtype=torch.long)).backward()

    return step


def worker(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["engine"] != "spconv":
        from ctsparse.device import set_threads

        set_threads(spec["threads"])  # torch, ME's OpenMP, and OpenBLAS at one thread (ctsparse's setting)
    if not spec.get("onednn", True):  # ctsparse's GEMMs on torch.mm (--no-onednn)
        from ctsparse.models import sitegemm

        sitegemm.ONEDNN = False
    data = np.load(spec["case"])
    torch.manual_seed(0)
    coords, feats = torch.from_numpy(data["coords"]), torch.from_numpy(data["feats"])
    if spec["engine"] == "spconv":
        fn = _spconv_task(spec["task"], coords, feats, spec["grid"])
    else:
        fn = _ctsparse_task(spec, coords, feats)
    grad = torch.enable_grad() if spec["task"] == "train" else torch.no_grad()
    with grad:
        fn()
        if spec.get("memory"):  # the process's allocator returns freed blocks: see measure_memory
            print(json.dumps({"peak_rise_mb": _peak_rise(fn)}))
            return
        print("ready", flush=True)
        for line in sys.stdin:  # one timed run per "run" line: the driver takes the engines in turn
            if line.strip() != "run":
                break
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}), flush=True)


# ---------------------------------------------------------------- the driver


def ensure_venv(venv: Path) -> Path:
    """The side environment's python, with spconv 2.3.8 (+ cumm) and torch 2.13.0 installed."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import spconv.pytorch, torch; assert torch.__version__.startswith('2.13.0')"]
    if python.exists() and subprocess.run(probe, capture_output=True, check=False).returncode == 0:
        return python
    print(f"installing spconv 2.3.8 into {venv} (benchmark only)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0", "numpy", "spconv==2.3.8", "cumm"], check=True)
    subprocess.run(probe, check=True)
    return python


def make_cases(
    occupancies: list[float], grid: tuple[int, int, int], channels: int, out: Path
) -> list[dict[str, Any]]:
    """CT-like site sets on `grid`: the phantom's voxels above the HU quantile of each occupancy."""
    from ctsparse.data.phantoms import case_rng, make_phantom

    spacing = tuple(f / g for f, g in zip(FIELD_MM, grid, strict=True))
    vol = make_phantom("nodule", case_rng(0, 0), spacing=spacing, source="phantom:0/0")
    hu = vol.array[: grid[0], : grid[1], : grid[2]]
    assert hu.shape == grid, hu.shape
    rng = np.random.default_rng(0)
    cases = []
    for occ in occupancies:
        order = np.argsort(hu, axis=None, kind="stable")[::-1][: round(occ * hu.size)]
        coords = np.ascontiguousarray(np.stack(np.unravel_index(np.sort(order), grid), 1), dtype=np.int32)
        feats = rng.standard_normal((len(coords), channels)).astype(np.float32)
        path = out / f"occ{occ:g}.npz"
        np.savez(path, coords=coords, feats=feats)
        threshold = float(hu.reshape(-1)[order[-1]])
        cases.append({"occupancy": occ, "sites": len(coords), "hu_threshold": threshold, "path": str(path)})
    return cases


# --keep-freed: glibc keeps freed memory for reuse instead of unmapping it, so that a new tensor
# of tens of megabytes does not page-fault on every allocation
KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def _env(threads: int, memory: bool = False, keep_freed: bool = False) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["OPENBLAS_NUM_THREADS"] = "1"
    if memory:  # glibc hands every freed block above 128 KiB back to the system
        env.update({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"})
    elif keep_freed:
        env.update(KEEP_FREED)
    return env


def _reply(proc: subprocess.Popen[str]) -> str:
    """The next line the worker prints that is its own (JSON or "ready"), "" when it died."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(("{", "ready")):
            return line.strip()
    return ""


def time_engines(pythons: dict[str, str], spec: dict[str, Any], runs: int) -> dict[str, dict[str, Any]]:
    """One process per engine, all started and warmed up first; then `runs` rounds in which each
    engine, in rotating order, runs once while the others wait, so that load from outside the
    benchmark falls on all of them alike. Returns median wall and CPU seconds per engine."""
    procs: dict[str, subprocess.Popen[str]] = {}
    logs: dict[str, Any] = {}
    out: dict[str, dict[str, Any]] = {}
    for engine, python in pythons.items():
        logs[engine] = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed below, after the runs)
        cmd = [python, __file__, "--worker", json.dumps({**spec, "engine": engine})]
        procs[engine] = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[engine], text=True,
            env=_env(spec["threads"], keep_freed=spec.get("keep_freed", False)),
        )  # fmt: skip
    ready = [e for e in procs if _reply(procs[e]) == "ready"]
    times: dict[str, list[tuple[float, float]]] = {e: [] for e in ready}
    for r in range(runs):
        for engine in ready[r % len(ready) :] + ready[: r % len(ready)] if ready else []:
            proc = procs[engine]
            assert proc.stdin is not None
            proc.stdin.write("run\n")
            proc.stdin.flush()
            reply = _reply(proc)
            if reply:
                got = json.loads(reply)
                times[engine].append((got["wall"], got["cpu"]))
    for engine, proc in procs.items():
        try:
            assert proc.stdin is not None
            proc.stdin.write("quit\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        proc.wait()
        logs[engine].seek(0)
        tail = (logs[engine].read().strip().splitlines() or ["no output"])[-1][:300]
        logs[engine].close()
        got = times.get(engine, [])
        if len(got) < runs:
            out[engine] = {"error": tail}
            continue
        wall, cpu = [w for w, _ in got], [c for _, c in got]
        out[engine] = {
            "median_s": statistics.median(wall),
            "cpu_median_s": statistics.median(cpu),
            "times_s": wall,
        }
    return out


def measure_memory(python: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The rise of a fresh worker's RSS high-water mark over its second run, with an allocator
    that returns freed blocks, so that the RSS before that run holds only live data."""
    cmd = [python, __file__, "--worker", json.dumps({**spec, "memory": True})]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(spec["threads"], True), check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"memory_error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--occupancies", default="5,12,20,35", help="percent")
    ap.add_argument("--tasks", default="conv16,conv64,forward,train")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", default="cube", choices=["cube", "cross"], help="spconv has no cross")
    ap.add_argument("--grid", default=",".join(map(str, GRID)), help="site grid X,Y,Z")
    ap.add_argument("--channels", type=int, default=CHANNELS, help="input channels of the classifier")
    ap.add_argument("--threads", default="1", help="comma-separated thread counts")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument(
        "--keep-freed", action="store_true",
        help="time with glibc keeping freed memory (no page faults on reallocation) for every engine",
    )  # fmt: skip
    ap.add_argument("--no-onednn", action="store_true", help="ctsparse's GEMMs on torch.mm, not oneDNN")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    engines = args.engines.split(",")
    side = str(ensure_venv(args.venv)) if "spconv" in engines else ""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-spconv-") as tmp:
        grid = tuple(int(v) for v in args.grid.split(","))
        occupancies = [float(v) / 100 for v in args.occupancies.split(",")]
        cases = make_cases(occupancies, grid, args.channels, Path(tmp))  # type: ignore[arg-type]
        for threads in (int(t) for t in args.threads.split(",")):
            for case in cases:
                for task in args.tasks.split(","):
                    row: dict[str, Any] = {"threads": threads, "task": task, "kernel": args.kernel, **case}
                    del row["path"]
                    spec = {"task": task, "case": case["path"], "threads": threads, "grid": grid,
                            "kernel": args.kernel, "keep_freed": args.keep_freed,
                            "onednn": not args.no_onednn}  # fmt: skip
                    pythons = {e: side if e == "spconv" else sys.executable for e in engines}
                    if args.kernel != "cube":
                        pythons.pop("spconv", None)
                        row["spconv"] = {"error": "spconv has no cross kernel"}
                    row.update(time_engines(pythons, spec, args.runs))
                    for engine, python in pythons.items():
                        row[engine].update(measure_memory(python, {**spec, "engine": engine}))
                    if "median_s" in row.get("dense", {}):
                        row["ideal_s"] = case["occupancy"] * row["dense"]["median_s"]
                    rows.append(row)
                    print(_line(row, engines), flush=True)
                    if args.json:  # after every row: a long run interrupted keeps what it measured
                        args.json.write_text(
                            json.dumps(
                                {
                                    "grid": grid,
                                    "channels": args.channels,
                                    "runs": args.runs,
                                    "keep_freed": args.keep_freed,
                                    "onednn": not args.no_onednn,
                                    "rows": rows,
                                },
                                indent=1,
                            )
                        )
                        args.json.with_suffix(".md").write_text(markdown(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table of docs/benchmarks.md: per occupancy and task, each engine's median time (and
    peak rise), ctsparse against spconv and ME, and against the ideal."""
    lines = [
        "| occupancy | sites | task | spconv 2.3.8 | ME 0.5.4 | ctsparse | dense twin | ctsparse vs spconv "
        "| ctsparse vs ME | ctsparse / ideal | memory: spconv / ME / ctsparse |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(r: dict[str, Any]) -> str:
        return f"{1e3 * r['median_s']:.0f} ms" if "median_s" in r else "error"

    def mb(r: dict[str, Any]) -> str:
        return f"{r['peak_rise_mb']:.0f}" if "peak_rise_mb" in r else "?"

    def ratio(other: dict[str, Any], t: float | None) -> str:
        return f"{other['median_s'] / t:.2f}× faster" if t and "median_s" in other else "–"

    for row in rows:
        sp, me, ct, de = (row.get(e, {}) for e in ("spconv", "minkowski", "ctsparse", "dense"))
        t = ct.get("median_s")
        ideal = f"{t / row['ideal_s']:.2f}×" if t and row.get("ideal_s") else "–"
        lines.append(
            f"| {100 * row['occupancy']:g} % | {row['sites']:,} | {row['task']} | {ms(sp)} | {ms(me)} | "
            f"**{ms(ct)}** | {ms(de)} | {ratio(sp, t)} | {ratio(me, t)} | {ideal} "
            f"| {mb(sp)} / {mb(me)} / {mb(ct)} MB |"
        )
    return "\n".join(lines) + "\n"


def _line(row: dict[str, Any], engines: list[str]) -> str:
    cells = []
    for e in engines:
        r = row[e]
        if "median_s" not in r:
            cells.append(f"{e} error")
            continue
        mem = f"{r['peak_rise_mb']:.0f} MB" if "peak_rise_mb" in r else "memory error"
        cells.append(f"{e} {1e3 * r['median_s']:.0f} ms (cpu {1e3 * r['cpu_median_s']:.0f}) {mem}")
    return (
        f"{row['threads']} thr {100 * row['occupancy']:g}% {row['sites']} sites {row['task']}: "
        + ", ".join(cells)
    )


if __name__ == "__main__":
    main()
