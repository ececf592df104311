"""End-to-end prediction on a 300-slice 512x512 DICOM series against the bare pydicom decode.

    python benchmarks/bench_predict.py /tmp/big_dicom --runs 5 --threads 1

No training: the model is built from a config with random weights (or taken from --checkpoint) and
saved as a checkpoint, so that ctsparse's own predict code runs on it. Side by side in one process,
interleaved, N runs each (medians):
  bare        pydicom dcmread + pixel_array of every file, stacked (the reference: decode only)
  read        ctsparse.io.read_volume at native resolution
  read@sp     read_volume(spacing=...): resampled while decoding
  predict()   ctsparse.predict.predict(checkpoint, [series]), the function `ctsparse predict` calls;
              its per-scan read / preprocess / model times and its own wall time (checkpoint load
              and model build included)
  pipeline    the same stages called directly: read_volume -> sparsify -> collate -> model
  pipeline@sp the same with read_volume(spacing=cfg.preprocess.spacing), which makes sparsify's
              resample a no-op
Then, once, the wall time of the whole `python -m ctsparse predict` process (interpreter start,
torch + MinkowskiEngine import, checkpoint load, one scan, table output).

The series is generated with benchmarks/make_big_phantom_dicom.py when the folder is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import bare_pydicom, ensure_series

from ctsparse.meters import peak_memory


def make_checkpoint(args: argparse.Namespace, folder: Path, out: Path) -> tuple[Path, Any]:
    """A checkpoint with random weights for `args.config` (+ overrides), or the given one."""
    import torch

    from ctsparse.config import load_config
    from ctsparse.io import read_volume
    from ctsparse.models import create_model
    from ctsparse.models.checkpoint import load_checkpoint, save_checkpoint
    from ctsparse.sparsify import sparsify

    if args.checkpoint:
        return args.checkpoint, load_checkpoint(args.checkpoint).config
    cfg = load_config(args.config, args.set)
    if cfg.preprocess.spacing is None and args.spacing:
        cfg.preprocess.spacing = [float(v) for v in args.spacing.split(",")]
    channels = sparsify(read_volume(folder, spacing=cfg.preprocess.spacing), cfg.preprocess).n_channels
    torch.manual_seed(0)
    model = create_model(cfg.model, channels, 2)
    save_checkpoint(out, model, cfg, ["normal", "nodule"], channels, {"note": "random weights (benchmark)"})
    return out, cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="DICOM series folder (generated if missing or empty)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (stable numbers: 1)")
    ap.add_argument("--config", type=Path, default=Path("configs/phantom.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument(
        "--spacing", default="3.65,3.65,5.0", help="preprocess.spacing when the config has none (mm)"
    )
    ap.add_argument("--checkpoint", type=Path, help="use this checkpoint instead of random weights")
    ap.add_argument("--no-cli", action="store_true", help="skip the `ctsparse predict` process timing")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/predict.json"))
    args = ap.parse_args(argv)
    import torch

    from ctsparse.collate import collate
    from ctsparse.device import set_threads
    from ctsparse.io import read_volume
    from ctsparse.models.checkpoint import build_from_checkpoint
    from ctsparse.predict import predict
    from ctsparse.sparsify import sparsify

    set_threads(args.threads)  # torch, ME's OpenMP and the BLAS behind ME's convolutions
    source = ensure_series(args.folder, 300, 512)
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    ckpt_path, cfg = make_checkpoint(args, args.folder, work / "random.pt")
    model, _ = build_from_checkpoint(ckpt_path)
    model = model.eval()
    dev = torch.device("cpu")
    spacing = cfg.preprocess.spacing

    def forward(sv: Any) -> Any:
        with torch.no_grad():
            batch = collate([sv], None, cfg.model, dev)
            return torch.softmax(model(batch.inputs).float(), dim=1).numpy()[0]

    def pipeline(read_spacing: Any) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            t0 = time.perf_counter()
            vol = read_volume(args.folder, spacing=read_spacing)
            t1 = time.perf_counter()
            sv = sparsify(vol, cfg.preprocess)
            del vol
            t2 = time.perf_counter()
            probs = forward(sv)
            t3 = time.perf_counter()
            return {"read_s": t1 - t0, "preprocess_s": t2 - t1, "model_s": t3 - t2, "sites": sv.n_sites,
                    "grid": list(sv.grid_shape), "probs": probs.tolist()}  # fmt: skip

        return run

    def lib_predict() -> dict[str, Any]:
        (row,) = predict(ckpt_path, [args.folder], device="cpu")
        if row.get("error"):
            raise RuntimeError(row["error"])
        return {k: row[k] for k in ("time_read_s", "time_preprocess_s", "time_model_s", "time_total_s",
                                    "sites", "grid", "peak_rss_mb", "p_normal", "p_nodule")}  # fmt: skip

    methods: dict[str, Callable[[], Any]] = {
        "bare pydicom decode": lambda: bare_pydicom(args.folder),
        "read_volume": lambda: read_volume(args.folder),
        "read_volume(spacing)": lambda: read_volume(args.folder, spacing=spacing),
        "predict()": lib_predict,
        "pipeline: read -> sparsify(resample) -> model": pipeline(None),
        "pipeline: read(spacing) -> sparsify -> model": pipeline(spacing),
    }
    for fn in methods.values():  # warm-up: imports, ME kernels, page cache
        fn()
    walls: dict[str, list[float]] = {k: [] for k in methods}
    peaks: dict[str, list[int]] = {k: [] for k in methods}
    details: dict[str, list[Any]] = {k: [] for k in methods}
    for _ in range(args.runs):
        for name, fn in methods.items():
            with peak_memory() as mem:
                t0 = time.perf_counter()
                out = fn()
                walls[name].append(time.perf_counter() - t0)
            peaks[name].append(mem.delta_bytes)
            if isinstance(out, dict):
                details[name].append(out)
            del out
    bare = statistics.median(walls["bare pydicom decode"])
    results: dict[str, Any] = {}
    for name in methods:
        med = statistics.median(walls[name])
        results[name] = {
            "median_s": med,
            "runs_s": [round(t, 4) for t in walls[name]],
            "over_bare": med / bare,
            "peak_rss_added_mb": max(peaks[name]) / 2**20,
        }
        if details[name]:
            first = details[name][0]
            keys = [k for k, v in first.items() if isinstance(v, float) and k.endswith("_s")]
            results[name]["stage_medians_s"] = {
                k: statistics.median(d[k] for d in details[name]) for k in keys
            }
            results[name]["last_run"] = {k: v for k, v in details[name][-1].items() if k not in keys}

    cli: dict[str, Any] = {}
    if not args.no_cli:
        out_json = work / "pred.json"
        cmd = [sys.executable, "-m", "ctsparse", "predict", str(ckpt_path), str(args.folder),
               "--device", "cpu", "--threads", str(args.threads), "--out", str(out_json)]  # fmt: skip
        # as a user runs it: without the OMP_NUM_THREADS this script set for itself
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        cli = {"command": " ".join(cmd[1:]), "wall_s": time.perf_counter() - t0, "exit": done.returncode}
        if done.returncode == 0:
            (row,) = json.loads(out_json.read_text())["rows"]
            cli["row_total_s"] = row["time_total_s"]
            cli["outside_the_scan_s"] = cli["wall_s"] - row["time_total_s"]
        else:
            cli["stderr"] = done.stderr[-2000:]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, MinkowskiEngine"], check=True)
        cli["import_torch_me_s"] = time.perf_counter() - t0

    n_files = sum(1 for p in args.folder.rglob("*") if p.is_file())
    print(f"\n{n_files} files ({source}); {args.threads} torch thread(s); median of {args.runs} runs")
    print(f"preprocess.spacing {spacing}, features {cfg.preprocess.features}, model {cfg.model.backend}")
    print(f"{'method':48} {'median':>9} {'x bare':>7} {'RSS +MB':>8}")
    for name, r in results.items():
        print(f"{name:48} {r['median_s']:9.3f} {r['over_bare']:7.2f} {r['peak_rss_added_mb']:8.0f}")
        if "stage_medians_s" in r:
            stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stage_medians_s"].items())
            print(f"{'':48}   {stages}")
    if cli:
        print(f"whole `ctsparse predict` process, once: {cli['wall_s']:.2f} s (exit {cli['exit']}); "
              f"python + torch + ME import alone {cli['import_torch_me_s']:.2f} s")  # fmt: skip

    report = {
        "folder": str(args.folder),
        "series_source": source,
        "files": n_files,
        "runs": args.runs,
        "threads": args.threads,
        "config": str(args.config) if not args.checkpoint else None,
        "checkpoint": str(args.checkpoint) if args.checkpoint else "random weights",
        "preprocess": vars(cfg.preprocess),
        "model": vars(cfg.model),
        "results": results,
        "cli_once": cli,
        "load_average": os.getloadavg(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {args.json}")
    shutil.rmtree(work, ignore_errors=True)  # the random-weights checkpoint and the CLI's output
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
