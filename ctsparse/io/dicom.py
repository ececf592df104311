"""DICOM reader: a file or a folder -> one series -> Volume.

A folder may hold several series (and stray non-DICOM files): headers are grouped by
SeriesInstanceUID, the requested series (or the largest CT series) is decoded, and everything
else is listed in ``meta["skipped"]``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from ctsparse.errors import ScanError
from ctsparse.io.dicom_headers import Slice, looks_like_dicom, read_header, slices_from_header
from ctsparse.io.dicom_series import assemble
from ctsparse.volume import Volume

# Attributes copied into meta: technical, never identifying.
_META_KEYWORDS = {
    "vendor": "Manufacturer",
    "model": "ManufacturerModelName",
    "series_description": "SeriesDescription",
    "body_part": "BodyPartExamined",
    "kernel": "ConvolutionKernel",
    "kvp": "KVP",
}


def folder_files(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Files directly in ``folder`` if any looks like DICOM; otherwise every file below it (a
    patient or study folder with one subfolder per series, maybe beside a README)."""
    direct = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not recursive and any(looks_like_dicom(p) for p in direct):
        return direct
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return found


def _series_summary(uid: str, slices: list[Slice]) -> str:
    header = slices[0].header
    n_files = len({s.path for s in slices})
    modality = header.get("Modality", "?")
    desc = header.get("SeriesDescription", "")
    return f"series {uid} ({modality}, {n_files} file(s){', ' + str(desc) if desc else ''})"


def _choose_series(
    groups: dict[str, list[Slice]], source: Path, series_uid: str | None, allow_non_ct: bool
) -> tuple[str, list[str]]:
    """Pick a series UID; return it and the lines describing the series left out."""
    if series_uid is not None:
        if series_uid not in groups:
            listed = ", ".join(sorted(groups)[:5])
            raise ScanError(source, f"series {series_uid} not found; available: {listed}")
        chosen = series_uid
    else:
        candidates = {
            uid: sl
            for uid, sl in groups.items()
            if allow_non_ct or str(sl[0].header.get("Modality", "")).upper() == "CT"
        }
        if not candidates:
            modalities = sorted({str(sl[0].header.get("Modality", "unknown")) for sl in groups.values()})
            raise ScanError(
                source,
                f"modality {'/'.join(modalities)} is not CT (pass allow_non_ct / --allow-non-ct to read it)",
            )
        # Largest by cross-sectional images, so a localizer-only series never wins over the scan.
        chosen = max(
            candidates,
            key=lambda uid: (sum(not s.localizer for s in candidates[uid]), len(candidates[uid]), uid),
        )
    skipped = []
    for uid, sl in groups.items():
        if uid != chosen:
            is_ct = str(sl[0].header.get("Modality", "")).upper() == "CT"
            why = "not the requested series" if series_uid else ("smaller" if is_ct else "not CT")
            skipped.append(f"{_series_summary(uid, sl)}: {why}")
    return chosen, skipped


def _read_headers(source: Path, files: list[Path]) -> tuple[dict[str, list[Slice]], list[str]]:
    """Slices grouped by SeriesInstanceUID, and one line per file that is not a usable image."""
    skipped: list[str] = []
    groups: dict[str, list[Slice]] = defaultdict(list)
    for f in files:
        read = read_header(f)
        if isinstance(read, str):
            if not source.is_dir():
                raise ScanError(source, read)
            skipped.append(f"{f.relative_to(source)}: {read}")
            continue
        try:
            slices = slices_from_header(f, read)
        except ValueError as exc:
            if not source.is_dir():
                raise ScanError(source, str(exc)) from None
            skipped.append(f"{f.relative_to(source)}: {exc}")
            continue
        groups[str(read.get("SeriesInstanceUID", "unknown"))].extend(slices)
    return groups, skipped


def read_dicom(
    path: str | Path,
    *,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    spacing: Sequence[float] | None = None,
) -> Volume:
    """Read a DICOM file (classic or enhanced multi-frame) or a folder holding one or more series,
    resampled while decoding to `spacing` (mm per RAS+ axis) if given."""
    source = Path(path)
    files = folder_files(source) if source.is_dir() else [source]
    if not files:
        raise ScanError(source, "empty folder")
    groups, skipped = _read_headers(source, files)
    if not groups and source.is_dir() and any(p.is_dir() for p in source.iterdir()):
        # only index files (DICOMDIR, reports) here: the images are in the subfolders
        files = folder_files(source, recursive=True)
        groups, skipped = _read_headers(source, files)
    if not groups:
        kinds = sorted({line.split(": ", 1)[1] for line in skipped})
        raise ScanError(source, f"no DICOM image in {len(files)} file(s) ({'; '.join(kinds[:3])})")

    chosen, other_series = _choose_series(groups, source, series_uid, allow_non_ct)
    slices = groups[chosen]
    header: Dataset = slices[0].header
    modality = str(header.get("Modality", "unknown"))
    if modality.upper() != "CT" and not allow_non_ct:
        raise ScanError(
            source, f"modality {modality} is not CT (pass allow_non_ct / --allow-non-ct to read it)"
        )

    array, affine, used, notes = assemble(slices, source, spacing)
    warnings = notes.warnings
    if other_series:
        warnings.insert(0, f"folder holds {len(groups)} series; read {_series_summary(chosen, slices)}")
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": modality,
        "series_uid": chosen,
        "n_files": len({s.path for s in used}),
        "n_slices": len(used),
        "enhanced": used[0].frame is not None,
        "transfer_syntax": str(getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", "") or ""),
        "warnings": warnings,
        "skipped": skipped + other_series + notes.skipped,
    }
    if notes.resampled_from:
        meta["resampled_from"] = notes.resampled_from
    for key, keyword in _META_KEYWORDS.items():
        value = header.get(keyword)
        if value is not None and str(value).strip():
            meta[key] = str(value).strip()
    return Volume(array=array, affine=affine, source=str(source), meta=meta)
