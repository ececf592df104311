"""The coded concepts of ctsparse's result SR: standard codes where they exist, local ones else.

Standard: DCM 122157 "Probability", UCUM "{ratio}" and "1", SCT Yes/No, LOINC 25045-6 "CT
unspecified body region". Everything the standards have no code for (the predicted class, the
class names, the operating threshold, sparse sites) is in the local coding scheme ``99CTSPARSE``,
declared in the SR's Coding Scheme Identification Sequence. Local code values are fixed here and
never change meaning; a class's code value is the class name as the checkpoint spells it.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

LOCAL_SCHEME = "99CTSPARSE"
LOCAL_SCHEME_NAME = "ctsparse local codes"
_MEANING_MAX = 64  # Code Meaning is LO: at most 64 characters


def local(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=value, scheme_designator=LOCAL_SCHEME, meaning=meaning[:_MEANING_MAX])


def class_code(name: str) -> hd.sr.CodedConcept:
    """A class of the checkpoint: the code value is its name (a long name becomes a Long Code Value)."""
    return local(name, name)


def scheme_item() -> hd.coding_schemes.CodingSchemeIdentificationItem:
    return hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME, responsible_organization="ctsparse"
    )


PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.Probability)  # DCM 122157
RATIO = hd.sr.CodedConcept.from_code(codes.UCUM.Ratio)  # UCUM {ratio}
NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)  # UCUM 1
SITES_UNIT = hd.sr.CodedConcept(value="{sites}", scheme_designator="UCUM", meaning="sites")
YES = hd.sr.CodedConcept.from_code(codes.SCT.Yes)
NO = hd.sr.CodedConcept.from_code(codes.SCT.No)
CT_PROCEDURE = hd.sr.CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion)

PREDICTED_CLASS = local("predicted-class", "Predicted class")
POSITIVE_CLASS = local("positive-class", "Positive class of the operating threshold")
OPERATING_THRESHOLD = local("threshold", "Operating threshold on the positive class probability")
TEMPERATURE = local("temperature", "Calibration temperature")
SITES = local("sites", "Sparse sites")
OCCUPANCY = local("occupancy", "Site occupancy of the cropped grid")
OUT_OF_RANGE = local("out-of-range", "Outside the training ranges")
OUT_OF_RANGE_NOTE = local("out-of-range-note", "Quantity outside the training ranges")
CLASSIFICATION = local("classification", "Whole-scan classification")
SALIENCY = local("saliency", "Saliency for the class explained")
