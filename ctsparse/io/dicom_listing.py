"""The series of a DICOM file or folder, from headers alone: what is there, and what is a scan.

A flat PACS export holds several series side by side (axial and reformatted CT, scouts, a dose
report, an MR of the same study). The headers are read once (values above ``DEFER_BYTES``, the
pixels, stay on disk) and grouped by SeriesInstanceUID; each group becomes a `SeriesInfo` that
knows its files, so reading one series later parses only its own files and decodes no pixels of
the series left out. `series_problem` says why a series is not a scan to classify; the reader's
default choice (the largest CT series) and `ctsparse.inputs` use the same rules.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctsparse.errors import NOT_CT, ScanError
from ctsparse.io.dicom_headers import Slice, looks_like_dicom, read_header, slices_from_header

# Secondary Capture storage classes (single and multi-frame): screenshots, dose reports, scanned
# documents. Their Modality is often CT, but they have no patient geometry to classify.
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a file or folder. Technical fields only, never patient identifiers."""

    uid: str
    modality: str
    description: str
    number: int | None
    n_slices: int  # cross-sectional images (one per frame of an enhanced file), scouts excluded
    n_localizers: int
    secondary_capture: bool
    files: tuple[Path, ...]

    def as_dict(self) -> dict[str, Any]:
        """The columns a report row names its series with."""
        return {
            "series_uid": self.uid,
            "series_description": self.description,
            "series_number": self.number,
            "modality": self.modality,
            "n_slices": self.n_slices,
        }

    def label(self) -> str:
        """'series 1.2.3 (CT, 120 slices, "Chest 1.0 B70f")' for one-line messages."""
        desc = f', "{self.description}"' if self.description else ""
        return f"series {self.uid} ({self.modality}, {self.n_slices + self.n_localizers} images{desc})"


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


def read_headers(source: Path, files: list[Path]) -> tuple[dict[str, list[Slice]], list[str]]:
    """Slices grouped by SeriesInstanceUID, and one line per file that is not a usable image.

    Raises:
        ScanError: ``source`` is a single file that is not a usable image.
    """
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


def source_files(source: Path) -> tuple[list[Path], dict[str, list[Slice]], list[str]]:
    """The files of a DICOM file or folder, their slices by series, and the unusable files.

    A folder holding only index files (DICOMDIR, reports) is searched recursively: the images are
    in its subfolders.
    """
    files = folder_files(source) if source.is_dir() else [source]
    groups, skipped = read_headers(source, files)
    if not groups and source.is_dir() and any(p.is_dir() for p in source.iterdir()):
        files = folder_files(source, recursive=True)
        groups, skipped = read_headers(source, files)
    return files, groups, skipped


def _number(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def series_info(uid: str, slices: list[Slice]) -> SeriesInfo:
    header = slices[0].header
    scouts = sum(s.localizer for s in slices)
    return SeriesInfo(
        uid=uid,
        modality=str(header.get("Modality", "") or "unknown"),
        description=str(header.get("SeriesDescription", "") or "").strip(),
        number=_number(header.get("SeriesNumber")),
        n_slices=len(slices) - scouts,
        n_localizers=scouts,
        secondary_capture=str(header.get("SOPClassUID", "")).startswith(_SECONDARY_CAPTURE),
        files=tuple(dict.fromkeys(s.path for s in slices)),
    )


def series_problem(info: SeriesInfo, allow_non_ct: bool = False) -> str | None:
    """Why this series is not a scan to classify, or None when it is one."""
    if info.modality.upper() != "CT" and not allow_non_ct:
        return f"modality {info.modality} {NOT_CT}"
    if info.secondary_capture:
        return "secondary capture (a screenshot or dose report), not a cross-sectional scan"
    if info.n_slices == 0:
        return f"localizer (scout) images only ({info.n_localizers})"
    return None


def size_key(info: SeriesInfo) -> tuple[int, int, str]:
    """Sort key of the default choice: most cross-sectional images, so scouts never win."""
    return (info.n_slices, info.n_slices + info.n_localizers, info.uid)


def largest_scan(infos: list[SeriesInfo], allow_non_ct: bool = False) -> SeriesInfo | None:
    """The series the reader takes when none is named: the largest one without a problem."""
    candidates = [i for i in infos if series_problem(i, allow_non_ct) is None]
    return max(candidates, key=size_key) if candidates else None
