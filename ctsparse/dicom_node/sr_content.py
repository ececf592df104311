"""The content tree of a result SR: a TID 1500 Measurement Report of one prediction row.

Its measurement groups (codes in ``codes.py``):

- group "classification": the predicted class (a qualitative evaluation), whether the scan lies
  outside the training ranges (SCT Yes/No) and one TEXT item per out-of-range quantity, the
  operating threshold and its positive class (two-class checkpoints), the calibration temperature,
  the sparse site count and occupancy; the algorithm identification (model name, ctsparse
  version, engine, config and checkpoint hashes, decision rule) and the source images;
- one group per class, its finding type the class, holding DCM "Probability" in UCUM {ratio}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ctsparse.calibration import Decision
from ctsparse.dicom_node import codes as c


def measurement_report(
    row: Mapping[str, Any], evidence: Sequence[Dataset], model: Mapping[str, Any]
) -> hd.sr.MeasurementReport:
    """The report of one prediction row, its source images the ``evidence`` headers."""
    decision = Decision.from_dict(model.get("decision"))
    classes = list(model.get("classes") or [k[2:] for k in row if k.startswith("p_")])
    algorithm = _algorithm(model, decision)
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.DCM.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # one device UID per model: the same checkpoint is the same observer in every report
            uid=generate_uid(
                entropy_srcs=["ctsparse", str(model.get("checkpoint_sha256", model.get("name")))]
            ),
            name="ctsparse",
            manufacturer_name="ctsparse",
            model_name=str(model.get("name", "ctsparse"))[:64],
        ),
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=c.CT_PROCEDURE,
        imaging_measurements=[
            _classification_group(row, decision, algorithm, list(evidence)),
            *_probability_groups(row, classes, algorithm),
        ],
    )


def _algorithm(model: Mapping[str, Any], decision: Decision) -> hd.sr.AlgorithmIdentification:
    keys = ("engine", "config_sha256", "checkpoint", "checkpoint_sha256")
    parameters = [f"{k}={model[k]}" for k in keys if model.get(k)]
    parameters.append(f"decision={decision.describe()}")
    return hd.sr.AlgorithmIdentification(
        name=str(model.get("name", "ctsparse")), version=str(model["ctsparse_version"]), parameters=parameters
    )


def _classification_group(
    row: Mapping[str, Any],
    decision: Decision,
    algorithm: hd.sr.AlgorithmIdentification,
    evidence: list[Dataset],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    warnings = [str(w) for w in row.get("warnings") or []]
    evaluations = [
        hd.sr.QualitativeEvaluation(c.PREDICTED_CLASS, c.class_code(str(row["label"]))),
        hd.sr.QualitativeEvaluation(c.OUT_OF_RANGE, c.YES if warnings else c.NO),
    ]
    measurements = [
        hd.sr.Measurement(c.SITES, float(row["sites"]), c.SITES_UNIT),
        hd.sr.Measurement(c.OCCUPANCY, float(row["occupancy"]), c.RATIO),
        hd.sr.Measurement(c.TEMPERATURE, float(decision.temperature), c.NO_UNITS),
    ]
    if decision.threshold is not None and decision.positive_class is not None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(c.POSITIVE_CLASS, c.class_code(decision.positive_class))
        )
        measurements.append(hd.sr.Measurement(c.OPERATING_THRESHOLD, float(decision.threshold), c.RATIO))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="classification"),
        finding_type=c.CLASSIFICATION,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in evidence],
    )
    # TID 1501 allows TEXT qualitative evaluations; highdicom builds only coded ones
    group[0].ContentSequence.extend(
        hd.sr.TextContentItem(c.OUT_OF_RANGE_NOTE, w[:1024], relationship_type="CONTAINS") for w in warnings
    )
    return group


def _probability_groups(
    row: Mapping[str, Any], classes: Sequence[str], algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=f"probability {name}"[:64]
            ),
            finding_type=c.class_code(name),
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(c.PROBABILITY, float(row[f"p_{name}"]), c.RATIO)],
        )
        for name in classes
    ]
