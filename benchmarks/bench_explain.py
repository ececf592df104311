"""Explain against predict on the same scans: time and peak memory, side by side.

    python benchmarks/bench_explain.py --work /tmp/bench_explain --runs 5 --threads 1 \\
        [--checkpoint runs/x/best.pt --scan some.nii.gz] [--no-native]

Cases:
  phantom  a default-size test phantom (96 x 96 x ~64, 3.65 mm) with --checkpoint (e.g. the
           pointing game's planned model: lung region, blob channel, 2^3 patches), or with random
           weights of configs/default.yaml when none is given;
  native   the 512 x 512 x 400, 0.7 mm phantom of benchmarks/bench_native.py at native resolution
           (configs/bone.yaml with 4^3 patches, random weights): the map is written on all 105 M
           voxels of the scan's grid.
Each run is a fresh `python -m ctsparse predict CK SCAN --out p.json` or `python -m ctsparse
explain CK SCAN --out DIR --method M` process, interleaved, so that no run inherits another's
heap. Reported per command, median over --runs: the scan's total time as the command reports it
(predict: read + preprocess + model; explain: read + preprocess + saliency + writing the NIfTI,
.npz and PNG), its peak RSS (ctsparse.meters.peak_memory over that scan, as each command reports
it) and the process wall time (interpreter, imports and checkpoint load included).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_native import make_scan

CTSPARSE = [sys.executable, "-m", "ctsparse"]


def random_checkpoint(scan: Path, out: Path, config: str | None, sets: list[str]) -> Path:
    """A checkpoint with random weights whose input channels fit `scan` under the config."""
    from ctsparse.config import load_config
    from ctsparse.io import read_volume
    from ctsparse.models import create_model
    from ctsparse.models.checkpoint import save_checkpoint
    from ctsparse.sparsify import sparsify

    cfg = load_config(config, sets)
    sv = sparsify(read_volume(scan), cfg.preprocess)
    save_checkpoint(
        out, create_model(cfg.model, sv.n_channels, 2).eval(), cfg, ["normal", "nodule"], sv.n_channels
    )
    return out


def one_run(cmd: str, ck: Path, scan: Path, threads: int, method: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench_explain_") as tmp:
        out = Path(tmp) / ("p.json" if cmd == "predict" else "maps")
        args = [
            *CTSPARSE,
            cmd,
            str(ck),
            str(scan),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--threads",
            str(threads),
        ]
        if cmd == "explain":
            args += ["--method", method]
        t0 = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        if cmd == "predict":
            row = json.loads(out.read_text())["rows"][0]
            return {"scan_s": row["time_total_s"], "peak_rss_mb": row["peak_rss_mb"], "wall_s": wall}
        report = json.loads(next(out.glob("*.json")).read_text())
        return {"scan_s": report["time_s"]["total"], "peak_rss_mb": report["peak_rss_mb"], "wall_s": wall}


def measure(name: str, ck: Path, scan: Path, args: argparse.Namespace) -> dict[str, Any]:
    commands = ["predict"] + [f"explain:{m}" for m in args.methods.split(",")]
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in commands}
    for r in range(args.runs):
        for c in commands:  # interleaved: slow phases of the shared machine hit every command
            cmd, _, method = c.partition(":")
            runs[c].append(one_run(cmd, ck, scan, args.threads, method))
            print(f"{name} run {r + 1}/{args.runs} {c}: {runs[c][-1]}", flush=True)
    med = {c: {k: statistics.median(x[k] for x in v) for k in v[0]} for c, v in runs.items()}
    ratios = {
        c: {
            "time": med[c]["scan_s"] / med["predict"]["scan_s"],
            "memory": med[c]["peak_rss_mb"] / med["predict"]["peak_rss_mb"],
        }
        for c in commands[1:]
    }
    return {
        "case": name,
        "scan": str(scan),
        "checkpoint": str(ck),
        "median": med,
        "over_predict": ratios,
        "runs": runs,
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="gradcam,inputxgrad")
    ap.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the phantom case")
    ap.add_argument("--scan", type=Path, help="the phantom case's scan (default: a generated one)")
    ap.add_argument("--no-native", action="store_true", help="skip the 512 x 512 x 400 case")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/explain.json"))
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    cases = []
    scan = args.scan
    if scan is None:
        from ctsparse.data.phantoms import case_rng, make_phantom, write_phantom

        scan = args.work / "phantom.nii.gz"
        if not scan.exists():
            vol = make_phantom("nodule", case_rng(7021, 1), vary_geometry=True, nodule_mm=(10.0, 20.0))
            write_phantom(vol, args.work / "phantom", "nifti")
    ck = args.checkpoint or random_checkpoint(scan, args.work / "phantom.pt", None, [])
    cases.append(measure("phantom", ck, scan, args))
    if not args.no_native:
        big = args.work / "big.nii"
        if not big.exists():
            make_scan(big)  # measurements run in child processes: this one's memory does not count
        big_ck = args.work / "native.pt"
        if not big_ck.exists():
            random_checkpoint(
                big, big_ck, "configs/bone.yaml", ["preprocess.features=patch", "preprocess.patch_size=4"]
            )
        cases.append(measure("native", big_ck, big, args))
    res = {
        "runs": args.runs,
        "threads": args.threads,
        "machine": f"{platform.machine()}, 2 cores shared",
        "cases": cases,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    for c in cases:
        print(c["case"], json.dumps(c["median"]), json.dumps(c["over_predict"]))


if __name__ == "__main__":
    main(sys.argv[1:])
