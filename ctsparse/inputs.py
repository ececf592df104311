"""What the user typed -> the scans to read: one item per NIfTI file and per CT series.

Inputs are files, DICOM folders, dataset folders and glob patterns. A DICOM folder may be a flat
export holding several series side by side; like dcm2niix, each CT series becomes its own item
that names the series it took, and every series left out (another modality, scouts, a dose-report
screenshot) is listed with the reason. Only headers are read here, once per file: an item carries
the files of its series, so reading it later parses nothing else and decodes no skipped pixels.

>>> found = expand_inputs(["export/"])  # doctest: +SKIP
>>> [(i.path.name, i.series.description, i.series.n_slices) for i in found.items]  # doctest: +SKIP
[('export', 'Chest 1.0 B70f', 312), ('export', 'Chest 3.0 MPR cor', 140)]
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctsparse.errors import CtsparseError
from ctsparse.io.dicom_listing import (
    SeriesInfo,
    largest_scan,
    series_info,
    series_problem,
    size_key,
    source_files,
)
from ctsparse.io.discover import find_scans, is_volume_file_name


@dataclass(frozen=True)
class InputItem:
    """One scan to read; `error` set when it cannot be (the row reports it and the run goes on)."""

    path: Path
    series_uid: str | None = None
    error: str | None = None
    series: SeriesInfo | None = None

    def read_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``ctsparse.io.read_volume`` that read exactly this item."""
        files = list(self.series.files) if self.series is not None else None
        return {"series_uid": self.series_uid, "files": files}

    def describe(self) -> dict[str, Any]:
        """Series columns for a report row (empty for NIfTI)."""
        return self.series.as_dict() if self.series is not None else {}


@dataclass(frozen=True)
class Skipped:
    """A series or group of files left out of a folder, and why."""

    path: Path
    reason: str
    series: SeriesInfo | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            **(self.series.as_dict() if self.series else {}),
            "reason": self.reason,
        }

    def line(self) -> str:
        what = f"{self.path}: {self.series.label()}" if self.series else str(self.path)
        return f"{what}: {self.reason}"


@dataclass
class Expansion:
    items: list[InputItem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _paths(text: str) -> list[Path] | None:
    if any(c in text for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(text))] or None
    return [Path(text)]


def _file_skips(source: Path, lines: list[str]) -> list[Skipped]:
    """Non-image DICOM files of a folder (reports, structure sets), grouped by reason. Files that
    are not DICOM at all (a README, labels.csv) are not worth a line."""
    reasons = Counter(
        line.split(": ", 1)[1]
        for line in lines
        if ": " in line and not line.endswith(("not a DICOM file", "DICOMDIR index, not an image"))
    )
    return [Skipped(source, f"{n} file(s): {why}") for why, n in sorted(reasons.items())]


def _dicom(
    source: Path, out: Expansion, series_uid: str | None, allow_non_ct: bool, all_series: bool, explicit: bool
) -> list[SeriesInfo] | None:
    """Items of one DICOM file or folder; the listed series when `series_uid` is not among them.

    A file or folder the user named (`explicit`) with nothing to read becomes an error item; one
    found inside a dataset folder (an MR series beside the CT ones) is only listed as skipped.
    """
    try:
        _files, groups, file_lines = source_files(source)
    except CtsparseError as exc:
        out.items.append(InputItem(source, error=getattr(exc, "reason", str(exc))))
        return None
    infos = sorted((series_info(uid, sl) for uid, sl in groups.items()), key=size_key, reverse=True)
    if not infos:
        kinds = "; ".join(sorted({line.split(": ", 1)[-1] for line in file_lines})[:3])
        out.items.append(InputItem(source, error=f"no DICOM image ({kinds})"))
        return None
    out.skipped += _file_skips(source, file_lines)
    if series_uid is not None:
        wanted = [i for i in infos if i.uid == series_uid]
        if not wanted:
            return infos
        problem = series_problem(wanted[0], allow_non_ct)
        out.items.append(InputItem(source, series_uid, problem, wanted[0]))
        out.skipped += [Skipped(source, "not the requested series", i) for i in infos if i.uid != series_uid]
        return None
    problems = {i.uid: series_problem(i, allow_non_ct) for i in infos}
    readable = [i for i in infos if problems[i.uid] is None]
    if not all_series:
        best = largest_scan(infos, allow_non_ct)
        readable = [best] if best is not None else []
    if not readable and explicit:  # nothing to read here: one error row rather than a silent nothing
        reasons = sorted({p for p in problems.values() if p})
        error = reasons[0] if len(reasons) == 1 else f"no series to read ({'; '.join(reasons)})"
        out.items.append(InputItem(source, error=error, series=infos[0] if len(infos) == 1 else None))
        return None
    out.items += [InputItem(source, i.uid, None, i) for i in readable]
    for i in infos:
        if i not in readable:
            out.skipped.append(
                Skipped(source, problems[i.uid] or "smaller series (one series per folder)", i)
            )
    return None


def expand_inputs(
    inputs: Iterable[str | Path | InputItem],
    *,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    all_series: bool = True,
) -> Expansion:
    """Files, DICOM folders, dataset folders and globs -> items to read, and what was left out.

    Args:
        series_uid: take only this SeriesInstanceUID; folders without it are listed as skipped
            (an error item for each folder if no input holds it).
        allow_non_ct: DICOM series of other modalities become items too.
        all_series: one item per series of a DICOM folder (as dcm2niix converts them); False
            keeps the largest CT series of each folder, as the reader and training do.

    `InputItem`s among the inputs are kept as they are.
    """
    out = Expansion()
    # folders without the requested series: their place in the order, path and series
    missing: dict[int, tuple[Path, list[SeriesInfo]]] = {}
    for entry in inputs:
        if isinstance(entry, InputItem):
            out.items.append(entry)
            continue
        paths = _paths(str(entry))
        if paths is None:
            out.items.append(InputItem(Path(str(entry)), error="no file matches this pattern"))
            continue
        for p in paths:
            if not p.exists():
                out.items.append(InputItem(p, error="no such file or folder"))
                continue
            scans = find_scans(p) if p.is_dir() else [p]
            if not scans:
                out.items.append(InputItem(p, error="no NIfTI, MetaImage or DICOM scan in this folder"))
            for scan in scans:
                if is_volume_file_name(scan):
                    out.items.append(InputItem(scan))
                    continue
                absent = _dicom(scan, out, series_uid, allow_non_ct, all_series, explicit=scan == p)
                if absent is not None:
                    missing[len(out.items)] = (scan, absent)
                    out.items.append(InputItem(scan))  # placeholder, resolved below
    if not missing:
        return out
    found = any(i.series_uid == series_uid for i in out.items)
    items = []
    for index, item in enumerate(out.items):
        if index not in missing:
            items.append(item)
            continue
        scan, infos = missing[index]
        if found:
            out.skipped += [Skipped(scan, "not the requested series", i) for i in infos]
        else:
            listed = ", ".join(i.uid for i in infos[:5])
            items.append(InputItem(scan, error=f"series {series_uid} not found; available: {listed}"))
    out.items = items
    return out
