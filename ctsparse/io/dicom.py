"""DICOM reader: a file or a folder -> one series -> Volume.

A folder may hold several series (and stray non-DICOM files): headers are grouped by
SeriesInstanceUID, the requested series (or the largest CT series) is decoded, and everything
else is listed in ``meta["skipped"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from ctsparse.errors import NOT_CT, NotCTError, ScanError
from ctsparse.io.dicom_headers import Slice
from ctsparse.io.dicom_listing import (
    largest_scan,
    read_headers,
    series_info,
    series_problem,
    source_files,
)
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


def _choose_series(
    groups: dict[str, list[Slice]], source: Path, series_uid: str | None, allow_non_ct: bool
) -> tuple[str, list[str]]:
    """Pick a series UID; return it and the lines describing the series left out."""
    infos = {uid: series_info(uid, sl) for uid, sl in groups.items()}
    if series_uid is not None:
        if series_uid not in groups:
            listed = ", ".join(sorted(groups)[:5])
            raise ScanError(source, f"series {series_uid} not found; available: {listed}")
        chosen = series_uid
    else:
        best = largest_scan(list(infos.values()), allow_non_ct)
        if best is None:
            problems = {uid: series_problem(info, allow_non_ct) for uid, info in infos.items()}
            modalities = sorted({i.modality for i in infos.values() if i.modality.upper() != "CT"})
            if modalities and not allow_non_ct and all(NOT_CT in (p or "") for p in problems.values()):
                raise NotCTError(source, "/".join(modalities))
            if len(infos) == 1:
                raise ScanError(source, str(next(iter(problems.values()))))
            listed = "; ".join(f"{infos[u].label()}: {p}" for u, p in sorted(problems.items()))
            raise ScanError(source, f"no series to read: {listed}")
        chosen = best.uid
    skipped = []
    for uid, info in infos.items():
        if uid != chosen:
            why = (
                "not the requested series"
                if series_uid
                else (series_problem(info, allow_non_ct) or "smaller")
            )
            skipped.append(f"{info.label()}: {why}")
    return chosen, skipped


def read_dicom(
    path: str | Path,
    *,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    spacing: Sequence[float] | None = None,
    files: Sequence[Path] | None = None,
) -> Volume:
    """Read a DICOM file (classic or enhanced multi-frame) or a folder holding one or more series,
    resampled while decoding to `spacing` (mm per RAS+ axis) if given.

    Args:
        files: the files to read instead of listing the folder (``SeriesInfo.files``), so that
            reading one series of a large export does not parse every other series' headers.
    """
    source = Path(path)
    if files is not None:  # listed by ctsparse.io.dicom_listing: parse only this series' files
        files = list(files)
        groups, skipped = read_headers(source, files)
    else:
        files, groups, skipped = source_files(source)
    if not files:
        raise ScanError(source, "empty folder")
    if not groups:
        kinds = sorted({line.split(": ", 1)[1] for line in skipped})
        raise ScanError(source, f"no DICOM image in {len(files)} file(s) ({'; '.join(kinds[:3])})")

    chosen, other_series = _choose_series(groups, source, series_uid, allow_non_ct)
    slices = groups[chosen]
    header: Dataset = slices[0].header
    modality = str(header.get("Modality", "unknown"))
    if modality.upper() != "CT" and not allow_non_ct:
        raise NotCTError(source, modality)

    array, affine, used, notes = assemble(slices, source, spacing)
    warnings = notes.warnings
    if other_series:
        warnings.insert(0, f"folder holds {len(groups)} series; read {series_info(chosen, slices).label()}")
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
