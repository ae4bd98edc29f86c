"""extract_header: plain JSON data, no identifying attributes unless asked, Enhanced MR lifted."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipeline.dicom.contrast import Contrast, classify
from pipeline.dicom.header import IDENTIFYING_KEYWORDS, ROUTING_KEYWORDS, extract_header

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def first_file(mr_brain: Path, series: str) -> Dataset:
    return pydicom.dcmread(min((mr_brain / series).glob("*.dcm")), stop_before_pixels=True)


def test_real_file_gives_plain_json(mr_brain: Path) -> None:
    ds = first_file(mr_brain, "brats-gli-00001/07_t1c")
    header = extract_header(ds)
    assert json.loads(json.dumps(header, allow_nan=False)) == header
    assert header["RepetitionTime"] == 500.0 and type(header["RepetitionTime"]) is float
    assert header["SeriesNumber"] == 7 and type(header["SeriesNumber"]) is int
    assert header["ImageType"] == ["ORIGINAL", "PRIMARY", "M", "ND"]
    assert header["ContrastBolusAgent"] == "GADOBUTROL 7.5ML"
    assert header["MagneticFieldStrength"] == 1.5
    assert "ScanOptions" not in header  # present in the file but empty: left out
    assert set(header) <= set(ROUTING_KEYWORDS)


def test_identifying_attributes_only_when_asked(mr_brain: Path) -> None:
    ds = first_file(mr_brain, "tcga-fg-6692-native/03_t1")
    ds.ReferringPhysicianName = "Doe^Jane"
    assert ds.PatientName and ds.PatientID  # the file has them ...
    header = extract_header(ds)
    assert not set(header) & IDENTIFYING_KEYWORDS  # ... the header does not
    assert not set(ROUTING_KEYWORDS) & IDENTIFYING_KEYWORDS
    asked = extract_header(ds, ["PatientID", "PatientName", "ReferringPhysicianName"])
    assert asked["PatientID"] == ds.PatientID
    assert asked["PatientName"] == str(ds.PatientName)  # a person name only as its string
    assert asked["ReferringPhysicianName"] == "Doe^Jane"
    json.dumps(asked)


def test_every_person_name_counts_as_identifying() -> None:
    for keyword in ("PatientName", "OperatorsName", "PerformingPhysicianName"):
        assert keyword in IDENTIFYING_KEYWORDS
    assert {"PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress"} <= (
        IDENTIFYING_KEYWORDS
    )


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValueError, match="SeriesDescripton"):
        extract_header(Dataset(), ["SeriesDescripton"])


def item(**elements: object) -> Dataset:
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def enhanced_mprage(*, shared: bool) -> Dataset:
    """An Enhanced MR MPRAGE after contrast, its physics only in the functional groups."""
    groups = item(
        MRTimingAndRelatedParametersSequence=[
            item(RepetitionTime=2300.0, FlipAngle=9.0, EchoTrainLength=1)
        ],
        MREchoSequence=[item(EffectiveEchoTime=2.98)],
        MRModifierSequence=[item(InversionRecovery="YES", InversionTimes=[900.0, 2500.0])],
        MRImageFrameTypeSequence=[item(FrameType=["ORIGINAL", "PRIMARY", "T1", "NONE"])],
        ContrastBolusUsageSequence=[
            item(ContrastBolusAgentNumber=1, ContrastBolusAgentAdministered="YES")
        ],
    )
    agent = item(CodeValue="C0304", CodingSchemeDesignator="SRT", CodeMeaning="Gadobutrol")
    return item(
        Modality="MR",
        SOPClassUID=ENHANCED_MR,
        ImageType=["ORIGINAL", "PRIMARY", "T1", "NONE"],
        AcquisitionContrast="T1",
        EchoPulseSequence="GRADIENT",
        MRAcquisitionType="3D",
        MagneticFieldStrength=3.0,
        SeriesDescription="t1_mprage_sag",
        ContrastBolusAgentSequence=[agent],
        NumberOfFrames=176,
        SharedFunctionalGroupsSequence=[groups if shared else Dataset()],
        PerFrameFunctionalGroupsSequence=[Dataset() if shared else groups, Dataset()],
    )


@pytest.mark.parametrize("shared", [True, False], ids=["shared groups", "first frame"])
def test_enhanced_mr_physics_is_lifted(shared: bool) -> None:
    header = extract_header(enhanced_mprage(shared=shared))
    assert header["RepetitionTime"] == 2300.0
    assert header["EchoTime"] == 2.98
    assert header["FlipAngle"] == 9.0
    assert header["EchoTrainLength"] == 1
    assert header["InversionRecovery"] == "YES"
    assert header["InversionTime"] == 900.0  # the first of InversionTimes
    assert header["AcquisitionContrast"] == "T1"
    assert header["ContrastBolusAgent"] == "Gadobutrol"
    assert header["ContrastBolusAgentAdministered"] == "YES"
    json.dumps(header, allow_nan=False)
    result = classify(header)
    assert result.contrast is Contrast.T1C, result.reason
    assert "TI 900 ms" in result.reason


def test_legacy_converted_enhanced_mr_is_lifted() -> None:
    unassigned = item(RepetitionTime=4500.0, EchoTime=100.0, ScanningSequence="SE")
    ds = item(
        Modality="MR",
        SOPClassUID="1.2.840.10008.5.1.4.1.1.4.4",
        ImageType=["ORIGINAL", "PRIMARY", "M", "NONE"],
        SharedFunctionalGroupsSequence=[
            item(UnassignedSharedConvertedAttributesSequence=[unassigned])
        ],
    )
    header = extract_header(ds)
    assert (header["RepetitionTime"], header["EchoTime"]) == (4500.0, 100.0)
    assert classify(header).contrast is Contrast.T2


def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element as it arrives off the network, before pydicom has checked it."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each bad value
def test_garbage_values_are_left_out() -> None:
    ds = Dataset()
    ds.Modality = "MR"
    ds[0x00180080] = raw(0x00180080, "DS", b"abc ")  # RepetitionTime
    ds[0x00180081] = raw(0x00180081, "DS", b"")  # EchoTime, empty
    ds[0x00180091] = raw(0x00180091, "IS", b"1.5x")  # EchoTrainLength
    ds[0x00181314] = raw(0x00181314, "DS", b"nan\\inf ")  # FlipAngle
    ds[0x00180082] = raw(0x00180082, "DS", b"900\\zz")  # InversionTime, one bad of two
    ds[0x00180087] = raw(0x00180087, "DS", b"3 ")  # MagneticFieldStrength, fine
    ds[0x7FE00010] = raw(0x7FE00010, "OB", b"\x00\x01")  # PixelData: bytes
    header = extract_header(ds, ["PixelData"])
    assert header == {"Modality": "MR", "MagneticFieldStrength": 3.0}
    json.dumps(header, allow_nan=False)
    assert classify(header).contrast is Contrast.OTHER
