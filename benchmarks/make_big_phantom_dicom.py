"""Write one full-size synthetic chest CT for the read / sparsify benchmarks.

    python benchmarks/make_big_phantom_dicom.py OUT_DIR [--slices 300] [--nifti-slices 400]

writes OUT_DIR/big_dicom/ (512 x 512 x 300, 0.7 mm pixels, 1 mm slices, one file per slice) and,
unless --nifti-slices 0, OUT_DIR/big.nii.gz (512 x 512 x 400, 0.7 mm). Prints the time and peak
memory of generating each volume.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from ctsparse.data.phantoms import case_rng, make_phantom, write_phantom


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _one(out: Path, name: str, slices: int, slice_mm: float, fmt: str) -> None:
    t0 = time.perf_counter()
    vol = make_phantom(
        "nodule",
        case_rng(2024, slices),
        shape=(512, 512, slices),
        spacing=(0.7, 0.7, slice_mm),
        source=f"phantom:2024/{slices}",
    )
    t1 = time.perf_counter()
    path = write_phantom(vol, out / name, fmt)  # type: ignore[arg-type]
    t2 = time.perf_counter()
    print(
        f"{path}: {vol.shape} at {vol.spacing} mm; generate {t1 - t0:.1f} s, write {t2 - t1:.1f} s, "
        f"peak RSS {_peak_rss_mb():.0f} MB, nodule {vol.meta['nodule_diameter_mm']} mm "
        f"at voxel {vol.meta['nodule_center_voxel']}"
    )


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--slices", type=int, default=300, help="DICOM slices (1 mm apart)")
    ap.add_argument("--nifti-slices", type=int, default=400, help="NIfTI slices (0.7 mm apart); 0 for none")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _one(args.out_dir, "big_dicom", args.slices, 1.0, "dicom")
    if args.nifti_slices:
        _one(args.out_dir, "big", args.nifti_slices, 0.7, "nifti")


if __name__ == "__main__":
    main(sys.argv[1:])
