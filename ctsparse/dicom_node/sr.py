"""A prediction row -> a DICOM Structured Report (TID 1500 Measurement Report) beside its study.

One SR per predicted DICOM series, in a new series of the source study: patient and study
attributes are copied from the source (highdicom copies the Patient and General Study modules),
every UID is new, and the Current Requested Procedure Evidence Sequence and the measurement
group's source images list every instance of the series the model read.

The content (``sr_content.py``) holds the class, every probability, the decision rule, the
site figures, the out-of-range notes and the model.

>>> started = {}
>>> rows = predict("best.pt", ["export/"], on_start=started.update)  # doctest: +SKIP
>>> write_result_sr(rows[0], None, "sr_out", started["model"])  # doctest: +SKIP
PosixPath('sr_out/1.2.826.0.1.3680043.8.498.1.sr.dcm')
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ctsparse.dicom_node import codes as c
from ctsparse.dicom_node.sr_content import measurement_report
from ctsparse.errors import CtsparseError, ScanError
from ctsparse.fileio import atomic_write
from ctsparse.io.dicom_listing import source_files

# The SR series is numbered after its source series (source + 9000): it sorts after the images in
# viewers and stays clear of the numbers scanners give their own series, which rarely pass 1000.
SR_SERIES_OFFSET = 9000
SERIES_DESCRIPTION = "ctsparse classification"
# The Type 2 patient and study attributes highdicom reads from the first source instance.
_TYPE2 = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
]

Source = str | Path | Dataset


@dataclass(frozen=True)
class SRResult:
    """What ``write_result_srs`` did for one row: the SR written, or why there is none."""

    scan: str
    series_uid: str | None
    sr_path: Path | None = None
    note: str | None = None  # no SR and no failure (a NIfTI input, a failed prediction)
    error: str | None = None  # the SR could not be written

    def columns(self) -> dict[str, str]:
        """Columns for the prediction row: the SR's path, or the one-line reason there is none."""
        return {
            "dicom_sr": str(self.sr_path) if self.sr_path else "",
            "dicom_sr_note": self.error or self.note or "",
        }


def series_sources(path: str | Path, series_uid: str) -> list[Path]:
    """The files of one series of a DICOM file or folder, as ``ctsparse.inputs`` lists them."""
    _files, groups, _lines = source_files(Path(path))
    if series_uid not in groups:
        raise ScanError(path, f"series {series_uid} not found")
    return list(dict.fromkeys(s.path for s in groups[series_uid]))


def _evidence(scan: str, series_uid: str, sources: Sequence[Source]) -> list[Dataset]:
    """Headers of the source instances (one per SOP instance), checked to be that series."""
    found: dict[str, Dataset] = {}
    for src in sources:
        if isinstance(src, Dataset):
            ds = src
        else:
            try:
                ds = pydicom.dcmread(src, stop_before_pixels=True)
            except Exception as exc:
                raise ScanError(src, f"unreadable DICOM header ({type(exc).__name__})") from exc
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise ScanError(scan, f"a source instance has no {keyword}")
        if ds.SeriesInstanceUID != series_uid:
            raise ScanError(
                scan, f"a source instance belongs to series {ds.SeriesInstanceUID}, not {series_uid}"
            )
        found.setdefault(str(ds.SOPInstanceUID), ds)
    if not found:
        raise ScanError(scan, "no source instance to reference")
    return list(found.values())


def build_result_sr(
    row: Mapping[str, Any],
    evidence: Sequence[Dataset],
    model: Mapping[str, Any],
    *,
    series_number: int | None = None,
) -> hd.sr.ComprehensiveSR:
    """The SR of one prediction row (in memory); see ``write_result_sr``."""
    if series_number is None:
        series_number = derived_series_number(evidence[0], SR_SERIES_OFFSET)
    # Comprehensive SR: the content has no 3D coordinates, and it is the SR class PACS accept most widely
    sr = hd.sr.ComprehensiveSR(
        evidence=[blank_patient(evidence[0]), *evidence[1:]],
        content=measurement_report(row, evidence, model),
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ctsparse",
        manufacturer_model_name=str(model.get("name", "ctsparse"))[:64],
        software_versions=str(model["ctsparse_version"]),
        series_description=SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,  # a model's output awaits a reader: PRELIMINARY, UNVERIFIED
        is_verified=False,
        content_qualification="RESEARCH",
        coding_schemes=[c.scheme_item()],
    )
    sr.copy_patient_and_study_information(evidence[0])  # as they are: the SR joins that study
    return sr


def blank_patient(source: Dataset) -> Dataset:
    """A copy of ``source`` with the patient and study values highdicom checks left blank.

    highdicom refuses some values that exports hold (sex "U", a partial date): a derived object is
    built from this copy, then takes the source's values as they are
    (``copy_patient_and_study_information``), so that it joins its study whatever they are.
    """
    blank = copy.deepcopy(source)
    for keyword in _TYPE2:
        setattr(blank, keyword, "")
    return blank


def derived_series_number(source: Dataset, offset: int) -> int:
    """The number of a series derived from ``source``'s: offset + its SeriesNumber (0 if none)."""
    try:
        return offset + int(source.get("SeriesNumber"))
    except (TypeError, ValueError):
        return offset


def write_result_sr(
    row: Mapping[str, Any],
    sources: Sequence[Source] | None,
    out_dir: str | Path,
    model: Mapping[str, Any],
    *,
    series_number: int | None = None,
) -> Path:
    """Write the SR of one prediction row of a DICOM series; returns ``out_dir/<series UID>.sr.dcm``.

    Args:
        row: a successful row of ``ctsparse.predict.predict`` (label, p_<class>, sites, occupancy,
            warnings, series_uid, path).
        sources: the series' files or headers (``InputItem.series.files``); None lists them again
            from ``row["path"]`` and ``row["series_uid"]``.
        model: the model card predict hands to ``on_start`` as ``"model"``
            (``ctsparse.models.checkpoint.describe_model``): name, versions, hashes, classes,
            decision rule.
        series_number: of the SR series; default the source's SeriesNumber + ``SR_SERIES_OFFSET``.

    Raises:
        ScanError: the row is not a successful DICOM prediction, or its sources cannot be read.

    The file is written atomically (a temp file renamed over the target); writing the same series
    again replaces its SR.
    """
    scan, series_uid = str(row.get("path", "")), row.get("series_uid")
    if row.get("error"):
        raise ScanError(scan, "the prediction failed: no SR")
    if not series_uid:
        raise ScanError(scan, "not a DICOM series: no SR")
    if sources is None:
        sources = series_sources(scan, str(series_uid))
    sr = build_result_sr(row, _evidence(scan, str(series_uid), sources), model, series_number=series_number)
    target = Path(out_dir) / f"{series_uid}.sr.dcm"
    with atomic_write(target) as fh:
        pydicom.dcmwrite(fh, sr, enforce_file_format=True)
    return target


def write_result_srs(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    model: Mapping[str, Any],
    sources: Sequence[Sequence[Source] | None] | None = None,
) -> list[SRResult]:
    """``write_result_sr`` for every row; a row that gets no SR says why, and the others go on.

    Args:
        sources: per row, its files (``InputItem.series.files``) or None to list them again.
    """
    results = []
    for k, row in enumerate(rows):
        scan, series_uid = str(row.get("path", "")), row.get("series_uid") or None
        if row.get("error"):
            results.append(SRResult(scan, series_uid, note="no SR: the prediction failed"))
            continue
        if series_uid is None:
            results.append(SRResult(scan, None, note="no SR: not a DICOM input"))
            continue
        try:
            path = write_result_sr(row, sources[k] if sources is not None else None, out_dir, model)
        except CtsparseError as exc:
            results.append(SRResult(scan, series_uid, error=f"SR not written: {exc}"))
        except Exception as exc:  # one series' odd header must not stop the others' reports
            results.append(SRResult(scan, series_uid, error=f"SR not written: {type(exc).__name__}: {exc}"))
        else:
            results.append(SRResult(scan, series_uid, sr_path=path))
    return results
