"""Native resolution: a 512x512x400, 0.7 mm chest CT in a bone window, classified without resampling.

    python benchmarks/bench_native.py --work /tmp/ctsparse_native --runs 3 --threads 1

1. Writes the phantom once (ctsparse.data.phantoms.make_phantom, spacing 0.7 mm, shape
   512x512x400, stored as uncompressed NIfTI int16 in WORK) in a subprocess.
2. Sparse: a fresh subprocess reads it (read_volume), sparsifies it with --config (default
   configs/bone.yaml: 200..3000 HU, body mask; plus --set overrides, default 2x2x2 patch
   features) and runs the sparse model (random weights, no gradient) --runs times. Reported: time
   of each stage, the forward's median, the peak RSS of the forward alone (VmHWM reset around it,
   ctsparse.meters.peak_memory) and the peak RSS of the whole child process (ru_maxrss from
   os.wait4: interpreter, torch + MinkowskiEngine, the volume, sparsify and the forward).
   With --layer-profile, also where the sparse forward spends its time (ctsparse.benchmark).
3. Dense twin: the same child with model.backend=dense, under RLIMIT_AS = --dense-cap-gb so that
   it cannot take the shared machine down (the sparse child runs under --sparse-cap-gb). Its
   memory need is estimated from the cropped grid first; if it fails under the cap, the failure
   is reported as the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPE = (512, 512, 400)
SPACING = (0.7, 0.7, 0.7)
DEFAULT_SET = ["preprocess.features=patch", "preprocess.patch_size=2"]


def make_scan(path: Path) -> None:
    from ctsparse.data.phantoms import case_rng, make_phantom
    from ctsparse.io import write_nifti

    t0 = time.perf_counter()
    vol = make_phantom("nodule", case_rng(2024, 400), shape=SHAPE, spacing=SPACING, source="phantom:2024/400")
    write_nifti(vol, path)
    print(f"wrote {path} ({vol.shape} at {vol.spacing} mm) in {time.perf_counter() - t0:.1f} s")


def child(args: argparse.Namespace) -> None:
    """One backend in this (fresh) process; results as JSON into args.out."""
    if args.cap_bytes:  # before torch is imported: the cap covers everything this process maps
        resource.setrlimit(resource.RLIMIT_AS, (args.cap_bytes, args.cap_bytes))
    import statistics

    import torch

    from ctsparse.collate import collate
    from ctsparse.config import load_config
    from ctsparse.device import set_threads
    from ctsparse.io import read_volume
    from ctsparse.meters import peak_memory, peak_rss_bytes
    from ctsparse.models import create_model
    from ctsparse.sparsify import sparsify

    set_threads(args.threads)  # torch, ME's OpenMP and the BLAS behind ME's convolutions
    cfg = load_config(args.config, [*args.set, f"model.backend={args.child}"])
    res: dict[str, Any] = {"backend": args.child, "threads": torch.get_num_threads()}
    try:
        t0 = time.perf_counter()
        vol = read_volume(args.scan)
        t1 = time.perf_counter()
        sv = sparsify(vol, cfg.preprocess)
        t2 = time.perf_counter()
        res.update(grid_in=list(vol.shape), spacing=list(vol.spacing), read_s=t1 - t0, sparsify_s=t2 - t1)
        res.update(sparsify_stages_s=sv.stats["times"], sites=sv.n_sites, channels=sv.n_channels)
        res.update(grid=list(sv.grid_shape), occupancy_cropped=sv.occupancy)
        res["occupancy_input"] = sv.stats["occupancy_input"]
        del vol
        res["peak_rss_before_model_mb"] = peak_rss_bytes() / 2**20
        multiple = 2 ** (len(cfg.model.widths) - 1)
        model = create_model(cfg.model, sv.n_channels, 2).eval()
        dev = torch.device("cpu")
        times = []
        with peak_memory() as mem:
            for _ in range(args.runs):
                t0 = time.perf_counter()
                with torch.no_grad():
                    logits = model(collate([sv], None, args.child, dev, multiple).inputs)
                times.append(time.perf_counter() - t0)
        res.update(forward_s=statistics.median(times), forward_runs_s=times, logits=logits.tolist())
        res.update(forward_peak_rss_mb=mem.peak_bytes / 2**20, forward_added_mb=mem.delta_bytes / 2**20)
        res["peak_memory_method"] = mem.method
        if args.child == "sparse" and args.layer_profile:
            from ctsparse.benchmark import layer_profile

            res["layer_profile_s"] = layer_profile(sv, cfg.model, dev, runs=1)
    except (MemoryError, RuntimeError) as exc:
        res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    Path(args.out).write_text(json.dumps(res, indent=2))


def run_child(args: argparse.Namespace, backend: str, cap_bytes: int | None) -> dict[str, Any]:
    out = args.work / f"{backend}.json"
    out.unlink(missing_ok=True)
    runs = args.runs if backend == "sparse" else args.dense_runs
    cmd = [sys.executable, __file__, "--child", backend, "--scan", str(args.scan), "--out", str(out),
           "--config", str(args.config), "--runs", str(runs), "--threads", str(args.threads),
           "--cap-bytes", str(cap_bytes or 0), *[f"--set={s}" for s in args.set],
           *(["--layer-profile"] if args.layer_profile else [])]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    res: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    # ru_maxrss is the high-water mark since the child's last VmHWM reset (peak_memory resets it
    # around the forward), so the process peak is the larger of it and the peak before that reset
    peak = max(usage.ru_maxrss / 1024, res.get("peak_rss_before_model_mb", 0.0))  # KiB on Linux
    res.update(
        process_wall_s=time.perf_counter() - t0,
        exit_status=os.waitstatus_to_exitcode(status),
        process_peak_rss_mb=peak,
        address_space_cap_gb=cap_bytes / 2**30 if cap_bytes else None,
    )
    proc.returncode = res["exit_status"]
    return res


def dense_estimate_mb(sparse: dict[str, Any], widths: list[int]) -> float:
    """Rough need of the dense forward: its input plus ~4 live stage-0 activations on the padded grid."""
    multiple = 2 ** (len(widths) - 1)
    voxels = 1
    for n in sparse["grid"]:
        voxels *= -(-n // multiple) * multiple
    return voxels * 4 * (sparse["channels"] + 4 * widths[0]) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ctsparse_native"))
    ap.add_argument("--config", type=Path, default=Path("configs/bone.yaml"))
    ap.add_argument("--set", action="append", default=None, help=f"config override (default {DEFAULT_SET})")
    ap.add_argument("--runs", type=int, default=3, help="sparse forward passes (median)")
    ap.add_argument("--dense-runs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-cap-gb", type=float, default=8.0, help="RLIMIT_AS of the dense child")
    ap.add_argument("--sparse-cap-gb", type=float, default=12.0, help="RLIMIT_AS of the sparse child")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument(
        "--layer-profile", action="store_true", help="also where the sparse forward spends its time"
    )
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/native.json"))
    ap.add_argument("--child", choices=["sparse", "dense"], help=argparse.SUPPRESS)
    ap.add_argument("--scan", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cap-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.set = DEFAULT_SET if args.set is None else args.set
    if args.make:
        make_scan(args.make)
        return 0
    if args.child:
        child(args)
        return 0

    from ctsparse.config import load_config

    args.work.mkdir(parents=True, exist_ok=True)
    args.scan = args.work / "chest_512x512x400_0.7mm.nii"
    if not args.scan.is_file():
        subprocess.run([sys.executable, __file__, "--make", str(args.scan)], check=True)
    cfg = load_config(args.config, args.set)
    report: dict[str, Any] = {
        "scan": str(args.scan),
        "config": str(args.config),
        "set": args.set,
        "preprocess": vars(cfg.preprocess),
        "model": vars(cfg.model),
        "threads": args.threads,
        "load_average_start": os.getloadavg(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    sparse = run_child(args, "sparse", int(args.sparse_cap_gb * 2**30))
    report["sparse"] = sparse
    print(json.dumps({k: v for k, v in sparse.items() if k not in ("logits", "forward_runs_s")}, indent=1))
    if not args.no_dense and "grid" in sparse:
        cap = int(args.dense_cap_gb * 2**30)
        est = dense_estimate_mb(sparse, cfg.model.widths) + sparse["peak_rss_before_model_mb"]
        report["dense_estimate_mb"] = est
        print(f"dense twin: estimated peak {est:.0f} MB; running under RLIMIT_AS {args.dense_cap_gb:g} GB")
        dense = run_child(args, "dense", cap)
        report["dense"] = dense
        print(json.dumps({k: v for k, v in dense.items() if k not in ("logits", "forward_runs_s")}, indent=1))
    report["load_average_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
