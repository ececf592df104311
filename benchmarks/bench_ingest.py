"""Ingest benchmark: read a large DICOM series and sparsify it.

    python benchmarks/bench_ingest.py /tmp/big_dicom --runs 3 --json benchmarks/results/ingest.json

Measures the median wall time (and peak RSS during the call) of
  (a) bare pydicom: dcmread + pixel_array of every file, stacked (no sorting, no HU, no geometry),
  (b) ctsparse.io.read_volume (grouping, sorting, HU, geometry checks, canonical orientation),
  (c) read_volume + sparsify with the default preprocess config (native resolution),
  (d) read_volume(spacing=3.65,3.65,5): resampled slice by slice while decoding,
  (e) SimpleITK ImageSeriesReader, when SimpleITK is installed.
If the folder is missing or empty, a synthetic series (default 300 slices of 512x512) is written
into it once: with benchmarks/make_big_phantom_dicom.py if present (512x512 only), else from
synthetic_body() through ctsparse.io.write.write_dicom_series (`--size 128` for a quick check).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctsparse.config import PreprocessConfig
from ctsparse.meters import format_bytes, format_seconds, peak_memory
from ctsparse.volume import Volume


def synthetic_body(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0) -> Volume:
    """Ellipse of soft tissue with two lungs, a spine and a table, in air, with scanner-like noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = (np.arange(nx) - nx / 2)[:, None] / (nx / 2)
    y = (np.arange(ny) - ny / 2)[None, :] / (ny / 2)
    sl = np.full((nx, ny), -1000.0, dtype=np.float32)
    sl[(x / 0.8) ** 2 + (y / 0.55) ** 2 < 1] = 40.0
    for cx in (-0.35, 0.35):
        sl[((x - cx) / 0.25) ** 2 + ((y + 0.05) / 0.35) ** 2 < 1] = -850.0
    sl[(x / 0.08) ** 2 + ((y - 0.35) / 0.08) ** 2 < 1] = 700.0
    sl[(np.abs(y - 0.68) < 0.02) & (np.abs(x) < 0.9)] = 300.0  # table, separated by air
    arr = np.repeat(sl[:, :, None], nz, axis=2)
    arr += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return Volume(np.round(arr).astype(np.float32), affine, "synthetic")


def ensure_series(folder: Path, slices: int, size: int) -> str:
    if folder.is_dir() and any(folder.iterdir()):
        return "existing"
    maker = Path(__file__).with_name("make_big_phantom_dicom.py")
    if maker.is_file() and size == 512:
        # The phantom maker writes OUT_DIR/big_dicom (512x512 only): generate next to the target, move.
        out_dir = folder.parent
        cmd = [sys.executable, str(maker), str(out_dir), "--slices", str(slices), "--nifti-slices", "0"]
        done = subprocess.run(cmd, check=False)
        made = out_dir / "big_dicom"
        if done.returncode == 0 and made.is_dir() and any(made.iterdir()):
            if made != folder:
                if folder.is_dir():
                    folder.rmdir()  # empty, checked above
                made.rename(folder)
            return maker.name
        print(f"{maker.name} failed (exit {done.returncode}); writing a synthetic series instead")
    from ctsparse.io.write import write_dicom_series

    folder.mkdir(parents=True, exist_ok=True)
    write_dicom_series(synthetic_body((size, size, slices), (0.7, 0.7, 1.0)), folder)
    return "synthetic_body + write_dicom_series"


def bare_pydicom(folder: Path) -> Any:
    import pydicom

    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return np.stack([pydicom.dcmread(f).pixel_array for f in files])


def ctsparse_read(folder: Path) -> Any:
    from ctsparse.io import read_volume

    return read_volume(folder)


def ctsparse_read_sparsify(folder: Path) -> Any:
    from ctsparse.io import read_volume
    from ctsparse.sparsify import sparsify

    return sparsify(read_volume(folder), PreprocessConfig())


def ctsparse_read_resampled(folder: Path) -> Any:
    from ctsparse.io import read_volume

    return read_volume(folder, spacing=(3.65, 3.65, 5.0))


def sitk_read(folder: Path) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def measure(
    methods: list[tuple[str, Callable[[Path], Any]]], folder: Path, runs: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Interleaved: run k of every method, then run k + 1, so load changes hit all methods alike."""
    times: dict[str, list[float]] = {name: [] for name, _ in methods}
    peaks: dict[str, list[int]] = {name: [] for name, _ in methods}
    last: dict[str, Any] = {}
    for _ in range(runs):
        for name, fn in methods:
            last.pop(name, None)  # free the previous result so runs do not overlap in memory
            with peak_memory() as mem:
                t0 = time.perf_counter()
                out = fn(folder)
                times[name].append(time.perf_counter() - t0)
            peaks[name].append(mem.delta_bytes)
            last[name] = out
            del out
    stats = {
        name: {
            "median_s": statistics.median(times[name]),
            "runs_s": [round(t, 4) for t in times[name]],
            "peak_delta_bytes": max(peaks[name]),
        }
        for name, _ in methods
    }
    return stats, last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="DICOM series folder (generated if missing or empty)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/bench_ingest.json"))
    args = ap.parse_args(argv)

    source = ensure_series(args.folder, args.slices, args.size)
    n_files = sum(1 for p in args.folder.rglob("*") if p.is_file())
    n_bytes = sum(p.stat().st_size for p in args.folder.rglob("*") if p.is_file())
    methods: list[tuple[str, Callable[[Path], Any]]] = [
        ("pydicom dcmread+pixel_array", bare_pydicom),
        ("ctsparse read_volume", ctsparse_read),
        ("read_volume + sparsify", ctsparse_read_sparsify),
        ("read_volume(spacing=3.65,3.65,5)", ctsparse_read_resampled),
    ]
    try:
        import SimpleITK  # noqa: F401

        methods.append(("SimpleITK ImageSeriesReader", sitk_read))
    except ImportError:
        print("SimpleITK is not installed: skipped (e)")
    sparse_stats: dict[str, Any] = {}
    results, last = measure(methods, args.folder, args.runs)
    for name, out in last.items():
        if name == "read_volume + sparsify":
            sparse_stats = {k: out.stats[k] for k in ("kept", "sites", "occupancy_input", "times")}
            sparse_stats["grid_shape"] = list(out.grid_shape)
        elif isinstance(out, Volume):
            results[name]["shape"] = list(out.shape)
    del last

    print(f"\n{n_files} files, {format_bytes(n_bytes)} ({source}); median of {args.runs} interleaved runs")
    print(f"{'method':32} {'median':>10} {'peak RSS +':>12}")
    for name, r in results.items():
        print(f"{name:32} {format_seconds(r['median_s']):>10} {format_bytes(r['peak_delta_bytes']):>12}")
    if sparse_stats:
        stages = ", ".join(f"{k} {format_seconds(v)}" for k, v in sparse_stats["times"].items())
        occ = sparse_stats["occupancy_input"]
        print(f"sparsify: {sparse_stats['sites']:,} sites, occupancy {occ:.1%}; {stages}")

    report = {
        "folder": str(args.folder),
        "series_source": source,
        "files": n_files,
        "bytes": n_bytes,
        "runs": args.runs,
        "results": results,
        "sparsify": sparse_stats,
        "simpleitk": any(name.startswith("SimpleITK") for name, _ in methods),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
