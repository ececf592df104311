"""A result SR written by ``sr.write_result_sr`` -> plain data, to check it against predict's rows.

Parsed with highdicom (``srread`` and the TID 1500 Measurement Report), so reading one back also
checks that the document is well formed. The dict carries UIDs and results only, never the patient
attributes the SR holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes

from ctsparse.dicom_node import codes as c
from ctsparse.errors import ScanError


def _code_value(concept: hd.sr.CodedConcept) -> str:
    return str(concept.value)


def _texts(group: hd.sr.MeasurementsAndQualitativeEvaluations, name: hd.sr.CodedConcept) -> list[str]:
    items = hd.sr.utils.find_content_items(group[0], name=name, value_type=hd.sr.ValueTypeValues.TEXT)
    return [str(item.TextValue) for item in items]


def _measurement(
    group: hd.sr.MeasurementsAndQualitativeEvaluations, name: hd.sr.CodedConcept
) -> float | None:
    found = group.get_measurements(name=name)
    return float(found[0].value) if found else None


def _evaluation(
    group: hd.sr.MeasurementsAndQualitativeEvaluations, name: hd.sr.CodedConcept
) -> hd.sr.CodedConcept | None:
    found = group.get_qualitative_evaluations(name=name)
    return found[0].value if found else None  # type: ignore[return-value]


def read_result_sr(path: str | Path) -> dict[str, Any]:
    """The classification, probabilities, model and references of a ctsparse result SR.

    Returns:
        ``{"sop_instance_uid", "series_instance_uid", "study_instance_uid", "series_number",
        "referenced_series_uid", "referenced_sop_instance_uids", "label", "confidence",
        "probabilities" ({class: p}), "positive_class", "threshold", "temperature", "sites",
        "occupancy", "out_of_range", "warnings", "model" ({"name", "version", "parameters"})}``

    Raises:
        ScanError: the file is not an SR, or not one ctsparse wrote.
    """
    try:
        sr = hd.sr.srread(path)
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
    except Exception as exc:
        raise ScanError(path, f"not a readable DICOM SR ({type(exc).__name__}: {exc})") from exc
    groups = report.get_image_measurement_groups()
    main = [g for g in groups if g.finding_type == c.CLASSIFICATION]
    if len(main) != 1:
        raise ScanError(path, "not a ctsparse result SR (no classification measurement group)")
    group = main[0]
    label = _evaluation(group, c.PREDICTED_CLASS)
    positive = _evaluation(group, c.POSITIVE_CLASS)
    out_of_range = _evaluation(group, c.OUT_OF_RANGE)
    probabilities = {
        _code_value(g.finding_type): float(g.get_measurements(name=c.PROBABILITY)[0].value)
        for g in groups
        if g.finding_type is not None
        and g.finding_type.scheme_designator == c.LOCAL_SCHEME
        and g.get_measurements(name=c.PROBABILITY)
    }
    algorithm = group[0]  # the group container: its algorithm items are direct children
    name = hd.sr.utils.find_content_items(algorithm, name=codes.DCM.AlgorithmName)
    version = hd.sr.utils.find_content_items(algorithm, name=codes.DCM.AlgorithmVersion)
    parameters = [
        str(item.TextValue).split("=", 1)
        for item in hd.sr.utils.find_content_items(algorithm, name=codes.DCM.AlgorithmParameters)
    ]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    label_name = _code_value(label) if label is not None else None
    return {
        "sop_instance_uid": str(sr.SOPInstanceUID),
        "series_instance_uid": str(sr.SeriesInstanceUID),
        "study_instance_uid": str(sr.StudyInstanceUID),
        "series_number": int(sr.SeriesNumber),
        "referenced_series_uid": str(evidence[0].SeriesInstanceUID),
        "referenced_sop_instance_uids": [
            str(ref.ReferencedSOPInstanceUID) for series in evidence for ref in series.ReferencedSOPSequence
        ],
        "label": label_name,
        "confidence": probabilities.get(label_name) if label_name is not None else None,
        "probabilities": probabilities,
        "positive_class": _code_value(positive) if positive is not None else None,
        "threshold": _measurement(group, c.OPERATING_THRESHOLD),
        "temperature": _measurement(group, c.TEMPERATURE),
        "sites": int(sites) if (sites := _measurement(group, c.SITES)) is not None else None,
        "occupancy": _measurement(group, c.OCCUPANCY),
        "out_of_range": out_of_range == c.YES if out_of_range is not None else None,
        "warnings": _texts(group, c.OUT_OF_RANGE_NOTE),
        "model": {
            "name": str(name[0].TextValue) if name else None,
            "version": str(version[0].TextValue) if version else None,
            "parameters": {p[0]: p[1] if len(p) > 1 else "" for p in parameters},
        },
    }
