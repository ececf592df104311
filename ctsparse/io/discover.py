"""Expand a dataset folder into scans: NIfTI files, MetaImage headers and DICOM series folders.

Decided by file names, a 132-byte sniff and at most a few headers per folder (never pixels), so a
large dataset is listed fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ctsparse.io.dicom_headers import looks_like_dicom, read_header
from ctsparse.io.metaimage import METAIMAGE_DATA_SUFFIXES, METAIMAGE_SUFFIXES, is_metaimage_name
from ctsparse.io.nifti import NIFTI_SUFFIXES, is_nifti_name


def is_volume_file_name(path: str | Path) -> bool:
    """A single-file scan by its name: NIfTI (.nii, .nii.gz) or MetaImage (.mhd, .mha)."""
    return is_nifti_name(path) or is_metaimage_name(path)


def scan_stem(name: str) -> str:
    """A file-name stem for a scan's outputs: its file name without the image suffix (.nii.gz,
    .nii, .mhd, .mha, .dcm), characters other than letters, digits, '.', '_' and '-' made '_'
    ("scan" when nothing is left)."""
    for suffix in (*NIFTI_SUFFIXES, *METAIMAGE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "scan"


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _has_dicom_image(files: list[Path]) -> bool:
    """True once one file is a DICOM image; DICOMDIR indexes, reports and RT structures are not."""
    for f in files:
        if (
            _visible(f)
            and not is_volume_file_name(f)
            and f.suffix.lower() not in METAIMAGE_DATA_SUFFIXES
            and looks_like_dicom(f)
            and not isinstance(read_header(f), str)
        ):
            return True
    return False


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return []


def is_scan_path(path: str | Path) -> bool:
    """True for a NIfTI file, a MetaImage header, a DICOM file, or a folder with DICOM files
    directly inside it."""
    p = Path(path)
    if not _visible(p) or not p.exists():
        return False
    if p.is_dir():
        return _has_dicom_image(_files(p))
    return is_volume_file_name(p) or looks_like_dicom(p)


def find_scans(root: str | Path) -> list[Path]:
    """Every scan under ``root``, sorted: each NIfTI file and MetaImage header (.mhd/.mha, not
    the .raw beside it), and each folder holding DICOM files.

    A folder whose files are DICOM counts as one scan (a dataset entry: the reader takes its
    largest CT series; ``ctsparse.inputs`` lists its series for predict and profile);
    its subfolders are searched too, so a study folder with one subfolder per series gives one
    scan per series. Hidden entries and non-image files (labels.csv, README, ...) are ignored.
    """
    base = Path(root)
    if base.is_file():
        return [base] if is_scan_path(base) else []
    scans: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(dirpath)
        files = [folder / f for f in sorted(filenames) if not f.startswith(".")]
        scans.extend(f for f in files if is_volume_file_name(f))
        if _has_dicom_image(files):
            scans.append(folder)
    return sorted(scans)
