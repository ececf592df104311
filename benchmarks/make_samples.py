"""Regenerate data_samples/: 10 small NIfTI phantoms, one DICOM series and one labels.csv.

    python benchmarks/make_samples.py [OUT_DIR]   # default: data_samples/ next to this folder

Cases 0-9 are NIfTI, case 10 is a DICOM series folder; all come from seed 0, so re-running
writes the same images. 64 x 64 x 40 voxels (350 mm field, 8 mm slices) keep the set under 5 MB
and let a tiny model train on it in seconds; nodules are 10-20 mm so that they remain visible at
this resolution.
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

from ctsparse.data.phantoms import generate_phantoms

SEED = 0
OPTIONS = {"shape": (64, 64, 40), "spacing": (5.47, 5.47, 8.0), "nodule_mm": (10.0, 20.0)}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # remove only what an earlier run of this script wrote
    for old in [*out.glob("case_*.nii.gz"), out / "labels.csv"]:
        old.unlink(missing_ok=True)
    for old in out.glob("case_*"):
        if old.is_dir():
            shutil.rmtree(old)
    generate_phantoms(out, 10, SEED, "nifti", **OPTIONS)  # type: ignore[arg-type]
    rows = _read(out / "labels.csv")
    generate_phantoms(out, 1, SEED, "dicom", first_index=10, **OPTIONS)  # type: ignore[arg-type]
    rows += _read(out / "labels.csv")
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    print(f"{len(rows)} scans in {out}: " + ", ".join(f"{p} {lab}" for p, lab in rows))


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return [[r["path"], r["label"]] for r in csv.DictReader(fh)]


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "data_samples")
