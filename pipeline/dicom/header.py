"""The header facts a series is routed and classified by, as a plain JSON-ready dict.

``extract_header`` reads one instance of a series and returns keyword -> value, with str,
int, float or lists of them as values; an element that is absent, empty or unusable
(a number that does not parse, NaN, bytes, a sequence) is left out, so absent means
unknown. Enhanced MR (multi-frame) objects keep their physics in functional groups; it is
lifted to the classic keywords (EffectiveEchoTime -> EchoTime, InversionTimes ->
InversionTime...) so one classifier serves both.

Patient-identifying attributes are never in the dict unless a caller names them in
``extra_keywords`` (a routing rule may match on them). Whoever logs a header must leave
out every keyword in ``IDENTIFYING_KEYWORDS``.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

from pydicom import Dataset
from pydicom.datadict import DicomDictionary, dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from pipeline.dicom.values import first_item

ROUTING_KEYWORDS: tuple[str, ...] = (
    # What the object is
    "Modality",
    "SOPClassUID",
    "ImageType",
    "ComplexImageComponent",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "ImagesInAcquisition",
    "NumberOfFrames",
    "NumberOfTemporalPositions",
    # Where it comes from
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "SoftwareVersions",
    "MagneticFieldStrength",
    # The pulse sequence
    "SequenceName",
    "PulseSequenceName",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "EchoPulseSequence",
    "SteadyStatePulseSequence",
    "EchoPlanarPulseSequence",
    "AngioFlag",
    "AcquisitionContrast",
    # Its physics
    "RepetitionTime",
    "EchoTime",
    "InversionRecovery",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "DiffusionBValue",
    "DiffusionDirectionality",
    # Contrast agent, and when the image was taken relative to it
    "ContrastBolusAgent",
    "ContrastBolusIngredient",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusAgentAdministered",
    "AcquisitionTime",
)

# Attributes that identify a patient (the patient rows of the Basic Application Level
# Confidentiality Profile, PS3.15 Table E.1-1) plus every person name in the dictionary.
IDENTIFYING_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientAge",
        "PatientSex",
        "PatientSize",
        "PatientWeight",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MedicalRecordLocator",
        "EthnicGroup",
        "Occupation",
        "MilitaryRank",
        "BranchOfService",
        "CountryOfResidence",
        "RegionOfResidence",
        "PatientReligiousPreference",
        "PatientComments",
        "AdditionalPatientHistory",
        "MedicalAlerts",
        "Allergies",
        "PregnancyStatus",
        "AccessionNumber",
        "StudyID",
        "AdmissionID",
        "InstitutionName",
        "InstitutionAddress",
    }
    | {entry[4] for entry in DicomDictionary.values() if entry[0] == "PN"}
)

_NUMERIC_VRS = frozenset({"DS", "IS", "FD", "FL", "US", "SS", "UL", "SL", "UV", "SV"})

# Functional-group macro -> {attribute in its item: keyword in the header}. Legacy
# Converted Enhanced MR keeps the classic attributes in the "Unassigned" groups.
_FUNCTIONAL_GROUPS: dict[str, dict[str, str] | None] = {
    "MRTimingAndRelatedParametersSequence": {
        "RepetitionTime": "RepetitionTime",
        "FlipAngle": "FlipAngle",
        "EchoTrainLength": "EchoTrainLength",
    },
    "MREchoSequence": {"EffectiveEchoTime": "EchoTime"},
    "MRModifierSequence": {
        "InversionRecovery": "InversionRecovery",
        "InversionTimes": "InversionTime",
    },
    "MRImageFrameTypeSequence": {
        "AcquisitionContrast": "AcquisitionContrast",
        "ComplexImageComponent": "ComplexImageComponent",
    },
    "MRDiffusionSequence": {
        "DiffusionBValue": "DiffusionBValue",
        "DiffusionDirectionality": "DiffusionDirectionality",
    },
    "ContrastBolusUsageSequence": {
        "ContrastBolusAgentAdministered": "ContrastBolusAgentAdministered"
    },
    # None: any wanted keyword, under its own name.
    "UnassignedSharedConvertedAttributesSequence": None,
    "UnassignedPerFrameConvertedAttributesSequence": None,
}


def extract_header(ds: Dataset, extra_keywords: Iterable[str] = ()) -> dict[str, Any]:
    """The routing and classification facts of ``ds``: ROUTING_KEYWORDS plus ``extra_keywords``.

    Raises ValueError if an extra keyword is not a DICOM keyword, so a typo in a routing
    rule is reported instead of never matching. Person names appear only when asked for,
    as their DICOM string.
    """
    wanted = list(dict.fromkeys([*ROUTING_KEYWORDS, *extra_keywords]))
    for keyword in wanted:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
    header = {}
    for keyword in wanted:
        value = _value(ds, keyword)
        if value is not None:
            header[keyword] = value
    for keyword, value in _functional_group_values(ds, wanted).items():
        header.setdefault(keyword, value)
    if "ContrastBolusAgent" not in header:
        agent = _agent_from_code_sequence(ds)
        if agent is not None:
            header["ContrastBolusAgent"] = agent
    return header


def _functional_group_values(ds: Dataset, wanted: list[str]) -> dict[str, Any]:
    """Values from the shared functional groups, else from the first frame's."""
    values: dict[str, Any] = {}
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = first_item(ds, groups_keyword)
        if groups is None:
            continue
        for macro, mapping in _FUNCTIONAL_GROUPS.items():
            item = first_item(groups, macro)
            if item is None:
                continue
            pairs = mapping.items() if mapping else ((kw, kw) for kw in wanted)
            for source, keyword in pairs:
                value = _value(item, source)
                if keyword == "InversionTime" and isinstance(value, list):
                    value = value[0]  # InversionTimes is multi-valued; the first inversion
                if value is not None:
                    values.setdefault(keyword, value)
    return values


def _agent_from_code_sequence(ds: Dataset) -> str | None:
    # Enhanced Contrast/Bolus module names the agent by a code, not a free text.
    item = first_item(ds, "ContrastBolusAgentSequence")
    if item is None:
        return None
    return _value(item, "CodeMeaning") or _value(item, "CodeValue")


def _value(ds: Dataset, keyword: str) -> Any:
    """The element's value as plain JSON data, or None if absent, empty or unusable."""
    if keyword not in ds:
        return None
    try:
        raw = ds.data_element(keyword).value
    except Exception:  # pydicom raises many types for a value that does not parse
        return None
    tag = tag_for_keyword(keyword)
    numeric = tag is not None and dictionary_VR(tag) in _NUMERIC_VRS
    if isinstance(raw, MultiValue | list | tuple):
        items = [_plain(item, numeric) for item in raw]
        # One bad item drops the element: items have positions, and a shifted list lies.
        if not items or any(item is None for item in items):
            return None
        return items[0] if len(items) == 1 else items
    return _plain(raw, numeric)


def _plain(value: Any, numeric: bool) -> str | int | float | None:
    if value is None or isinstance(value, bytes | bytearray | Dataset):
        return None
    if isinstance(value, int | float | Decimal):
        number = float(value) if isinstance(value, float | Decimal) else int(value)
        return number if math.isfinite(number) else None
    if numeric:
        return None  # a number element holding text (pydicom keeps invalid DS/IS as str)
    if isinstance(value, PersonName | datetime.date | datetime.time | str):
        return str(value).strip() or None
    return None
