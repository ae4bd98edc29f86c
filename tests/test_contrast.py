"""Contrast classification from header physics, over real vendor protocols and the real data.

The protocol table uses the parameters and header conventions each vendor writes for its
standard brain protocols, as published in the ADNI MRI protocols (adni.loni.usc.edu:
Siemens MPRAGE TR 2300/TE 2.98/TI 900/flip 9 at 3 T and TR 2400/TI 1000 at 1.5 T; GE
IR-FSPGR/BRAVO TR 7-8/TE 3/TI 400-450/flip 11-12; Philips 3D T1 TFE TR 8.1/TE 3.7/flip 8,
no TI in the header), the vendors' DICOM conformance statements and exported headers
(Siemens SequenceName *tse2d, *tir2d, *tfl3d, *spcir, *fl2d, *ep_b, SequenceVariant
SK\\SP\\MP; GE ScanOptions FAST_GEMS, IR_GEMS, EPI_GEMS; Philips ImageType
M_SE/M_IR/M_FFE and IR-only ScanningSequence), and the ranges in vendor application
guides and mriquestions.com: T1 SE TR 400-700/TE 8-15, T2 TSE/FSE TR 3000-6000/TE 80-120,
PD TE 10-30, 2D FLAIR TR 8000-11000/TE 80-140/TI 2000-2800, 3D FLAIR TI 1650-1900 with
TE 280-400, STIR TI 150-170 (1.5 T) and 210-250 (3 T), T1-FLAIR TR 2000-2500/TE 9-25/
TI 750-920, T2* GRE TR 500-800/TE 15-25/flip 15-20, FIESTA/CISS TR 4-6/flip 45-70.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import pytest

from pipeline.dicom.contrast import Classification, Contrast, classify
from pipeline.dicom.header import extract_header

ORIGINAL = ["ORIGINAL", "PRIMARY", "M", "ND"]
SIEMENS, GE, CANON = "SIEMENS", "GE MEDICAL SYSTEMS", "CANON_MEC"
PHILIPS = "Philips Medical Systems"


def mr(
    manufacturer: str,
    tesla: float,
    description: str,
    scanning: str | list[str],
    variant: str | list[str],
    tr: float | None,
    te: float | None,
    ti: float | None = None,
    flip: float | None = None,
    acquisition: str = "2D",
    **more: Any,
) -> dict[str, Any]:
    """A header as extract_header returns it for one protocol."""
    header = {
        "Modality": "MR",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4",
        "ImageType": ORIGINAL,
        "Manufacturer": manufacturer,
        "MagneticFieldStrength": tesla,
        "SeriesDescription": description,
        "ProtocolName": description,
        "ScanningSequence": scanning,
        "SequenceVariant": variant,
        "MRAcquisitionType": acquisition,
        "RepetitionTime": tr,
        "EchoTime": te,
        "InversionTime": ti,
        "FlipAngle": flip,
    }
    header.update(more)
    return {key: value for key, value in header.items() if value is not None}


PHILIPS_SE = ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
PHILIPS_IR = ["ORIGINAL", "PRIMARY", "M_IR", "M", "IR"]
PHILIPS_FFE = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]

# (id, expected, header): T1/T2/PD/FLAIR come from the physics alone; OTHER may also come
# from ImageType or from a description naming a localizer, DWI... (a veto, never a vote).
# fmt: off
PROTOCOLS = [
    # Siemens (syngo standard head protocols)
    ("siemens t1_se_tra", Contrast.T1,
     mr(SIEMENS, 1.5, "t1_se_tra", "SE", ["SP", "OSP"], 450, 8.7, flip=90, SequenceName="*se2d1")),
    ("siemens t2_tse_tra 3T", Contrast.T2,
     mr(SIEMENS, 3, "t2_tse_tra_p2", "SE", ["SK", "SP", "OSP"], 6000, 95, flip=150,
        SequenceName="*tse2d1_18", EchoTrainLength=18)),
    ("siemens t2_tirm dark-fluid", Contrast.FLAIR,
     mr(SIEMENS, 1.5, "t2_tirm_tra_dark-fluid", ["SE", "IR"], ["SK", "SP", "MP", "OSP"], 9000, 81,
        ti=2500, flip=150, SequenceName="*tir2d1_16")),
    ("siemens t2_tirm_cor STIR", Contrast.OTHER,
     mr(SIEMENS, 1.5, "t2_tirm_cor_p2", ["SE", "IR"], ["SK", "SP", "MP"], 4000, 56, ti=150,
        flip=150, SequenceName="*tir2d1_11")),
    ("siemens t2_tirm_cor STIR 3T", Contrast.OTHER,
     mr(SIEMENS, 3, "t2_tirm_cor_p2", ["SE", "IR"], ["SK", "SP", "MP"], 5000, 60, ti=230,
        flip=150)),
    ("siemens t1_mprage 3T", Contrast.T1,
     mr(SIEMENS, 3, "t1_mprage_sag_p2_iso", ["GR", "IR"], ["SK", "SP", "MP"], 2300, 2.98, ti=900,
        flip=9, acquisition="3D", SequenceName="*tfl3d1_16ns")),
    ("siemens t1_mprage 1.5T", Contrast.T1,
     mr(SIEMENS, 1.5, "t1_mprage_sag", ["GR", "IR"], ["SK", "SP", "MP"], 2400, 3.5, ti=1000,
        flip=8, acquisition="3D")),
    ("siemens MP2RAGE INV2", Contrast.OTHER,
     mr(SIEMENS, 3, "t1_mp2rage_sag_INV2", ["GR", "IR"], ["SK", "SP", "MP"], 5000, 2.9, ti=2500,
        flip=3, acquisition="3D")),
    ("siemens pd_tse_tra", Contrast.PD,
     mr(SIEMENS, 1.5, "pd_tse_tra", "SE", ["SK", "SP", "OSP"], 3000, 15, flip=150,
        EchoTrainLength=7)),
    ("siemens t2_space dark-fluid 3D", Contrast.FLAIR,
     mr(SIEMENS, 3, "t2_space_dark-fluid_sag_p2_iso", ["SE", "IR"], ["SK", "SP", "MP"], 5000, 388,
        ti=1800, flip=120, acquisition="3D", SequenceName="*spcir_278ns")),
    ("siemens t1 dark-fluid 3T (T1-FLAIR)", Contrast.T1,
     mr(SIEMENS, 3, "t1_tirm_tra_dark-fluid", ["SE", "IR"], ["SK", "SP", "MP"], 2000, 9.4, ti=860,
        flip=150)),
    ("siemens t2_swi", Contrast.OTHER,
     mr(SIEMENS, 3, "t2_swi_tra_p2", "GR", ["SK", "SP", "OSP"], 28, 20, flip=15, acquisition="3D",
        SequenceName="*swi3d1r", ImageType=["ORIGINAL", "PRIMARY", "M", "SWI", "ND"])),
    ("siemens ep2d_diff trace", Contrast.OTHER,
     mr(SIEMENS, 1.5, "ep2d_diff_3scan_trace", "EP", ["SK", "SP"], 3600, 89, flip=90,
        SequenceName="*ep_b1000t", ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"])),
    ("siemens t1_se post-contrast", Contrast.T1C,
     mr(SIEMENS, 1.5, "t1_se_tra_KM", "SE", ["SP", "OSP"], 450, 8.7, flip=90,
        ContrastBolusAgent="Gadovist")),
    ("siemens t1_fl2d_tra", Contrast.T1,
     mr(SIEMENS, 1.5, "t1_fl2d_tra", "GR", ["SP", "OSP"], 250, 2.67, flip=70,
        SequenceName="*fl2d1")),
    ("siemens localizer", Contrast.OTHER,
     mr(SIEMENS, 1.5, "localizer", "GR", ["SP", "OSP"], 8.6, 4, flip=20, SequenceName="*fl2d1")),
    ("siemens MPRAGE reformat", Contrast.OTHER,
     mr(SIEMENS, 3, "t1_mprage_sag_p2_iso_MPR_tra", ["GR", "IR"], ["SK", "SP", "MP"], 2300, 2.98,
        ti=900, flip=9, acquisition="3D", ImageType=["DERIVED", "PRIMARY", "MPR", "ND"])),
    ("siemens phase image", Contrast.OTHER,
     mr(SIEMENS, 3, "gre_field_mapping", "GR", ["SP"], 600, 7.4, flip=60,
        ImageType=["ORIGINAL", "PRIMARY", "P", "ND"])),
    # GE (Signa HDxt/MR750/Premier brain protocols)
    ("ge AX T1 SE", Contrast.T1,
     mr(GE, 1.5, "AX T1 SE", "SE", "NONE", 550, 14, flip=90, ScanOptions=["FC", "FILTERED_GEMS"])),
    ("ge AX T1 SE, field in gauss", Contrast.T1,
     mr(GE, 15000, "AX T1", "SE", "NONE", 550, 14, flip=90)),
    ("ge AX T2 FSE", Contrast.T2,
     mr(GE, 1.5, "AX T2 FSE", "SE", ["SK", "OSP"], 4500, 102, flip=90,
        ScanOptions=["FAST_GEMS", "FILTERED_GEMS"], EchoTrainLength=16)),
    ("ge AX T2 FLAIR", Contrast.FLAIR,
     mr(GE, 1.5, "AX T2 FLAIR", ["SE", "IR"], ["SK", "OSP"], 9000, 140, ti=2250, flip=90,
        ScanOptions=["FAST_GEMS", "IR_GEMS", "FC"])),
    ("ge SAG CUBE FLAIR 3T", Contrast.FLAIR,
     mr(GE, 3, "Sag CUBE FLAIR", ["SE", "IR"], ["SK", "MP"], 6000, 130, ti=1850, flip=90,
        acquisition="3D", ScanOptions=["FAST_GEMS", "IR_GEMS"])),
    ("ge SAG 3D T1 BRAVO 3T", Contrast.T1,
     mr(GE, 3, "SAG 3D T1 BRAVO", "GR", ["SS", "SK"], 8.2, 3.2, ti=450, flip=12, acquisition="3D",
        ScanOptions=["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"])),
    ("ge IR-FSPGR 1.5T", Contrast.T1,
     mr(GE, 1.5, "SAG IR-FSPGR", "GR", ["SS", "SP", "SK"], 8.9, 3.5, ti=600, flip=8,
        acquisition="3D")),
    ("ge 3D FSPGR without IR", Contrast.T1,
     mr(GE, 1.5, "AX 3D FSPGR", "GR", ["SS", "SP", "SK"], 7.8, 3, flip=15, acquisition="3D")),
    ("ge AX PD FSE", Contrast.PD,
     mr(GE, 1.5, "AX PD", "SE", ["SK", "OSP"], 2500, 20, flip=90, ScanOptions=["FAST_GEMS"])),
    ("ge AX T1 FLAIR 3T", Contrast.T1,
     mr(GE, 3, "AX T1 FLAIR", ["SE", "IR"], ["SK", "OSP"], 2200, 24, ti=860, flip=90,
        ScanOptions=["FAST_GEMS", "IR_GEMS"])),
    ("ge AX T1 SE post-contrast", Contrast.T1C,
     mr(GE, 1.5, "AX T1 SE +C", "SE", "NONE", 550, 14, flip=90, ContrastBolusAgent="MULTIHANCE",
        ContrastBolusVolume=15)),
    ("ge AX T2* GRE", Contrast.OTHER,
     mr(GE, 1.5, "AX GRE", "GR", "SP", 650, 15, flip=20)),
    ("ge AX DWI", Contrast.OTHER,
     mr(GE, 1.5, "AX DWI 1000b", ["EP", "SE"], ["SK", "SS"], 8000, 85, flip=90,
        ScanOptions=["EPI_GEMS", "PFP"])),
    ("ge 3D FIESTA-C IAC (physics)", Contrast.OTHER,
     mr(GE, 1.5, "AX 3D IAC", "GR", "SS", 5.5, 2.1, flip=65, acquisition="3D")),
    ("ge SAG CUBE T2 3T", Contrast.T2,
     mr(GE, 3, "Sag CUBE T2", "SE", ["SK", "MP"], 2500, 90, flip=90, acquisition="3D",
        ScanOptions=["FAST_GEMS"])),
    ("ge 3-plane localizer (SSFSE)", Contrast.OTHER,
     mr(GE, 1.5, "3-Plane Loc", "SE", ["SK", "SS"], 1200, 80, flip=90)),
    ("ge reformat", Contrast.OTHER,
     mr(GE, 3, "Sag T1 BRAVO REFORMAT", "GR", ["SS", "SK"], 8.2, 3.2, ti=450, flip=12,
        ImageType=["DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"])),
    # Philips (Ingenia/Achieva ExamCards)
    ("philips T1W_SE", Contrast.T1,
     mr(PHILIPS, 1.5, "T1W_SE", "SE", "SK", 550, 15, flip=90, ImageType=PHILIPS_SE)),
    ("philips T2W_TSE 3T", Contrast.T2,
     mr(PHILIPS, 3, "T2W_TSE", "SE", "SK", 3000, 80, flip=90, ImageType=PHILIPS_SE,
        EchoTrainLength=15)),
    ("philips T2W_FLAIR, IR only", Contrast.FLAIR,
     mr(PHILIPS, 1.5, "T2W_FLAIR", "IR", "SK", 11000, 140, ti=2800, flip=90,
        ImageType=PHILIPS_IR)),
    ("philips FLAIR without TI", Contrast.FLAIR,
     mr(PHILIPS, 1.5, "T2W_FLAIR", ["SE", "IR"], "SK", 11000, 125, flip=90, ImageType=PHILIPS_IR)),
    ("philips 3D FLAIR VISTA 3T", Contrast.FLAIR,
     mr(PHILIPS, 3, "3D_Brain_VIEW_FLAIR", "IR", "SK", 4800, 300, ti=1650, flip=90,
        acquisition="3D", ImageType=PHILIPS_IR)),
    ("philips 3D T1W_TFE, no TI", Contrast.T1,
     mr(PHILIPS, 3, "T1W_3D_TFE", "GR", "SK", 8.1, 3.7, flip=8, acquisition="3D",
        ImageType=PHILIPS_FFE)),
    ("philips 3D T1W_TFE 1.5T, no TI", Contrast.T1,
     mr(PHILIPS, 1.5, "sT1W_3D_TFE", "GR", ["MP", "SK"], 7.5, 3.4, flip=8, acquisition="3D",
        ImageType=PHILIPS_FFE)),
    ("philips PDW_TSE", Contrast.PD,
     mr(PHILIPS, 1.5, "PDW_TSE", "SE", "SK", 3000, 20, flip=90, ImageType=PHILIPS_SE)),
    ("philips T1W_TFE +C, agent tag never filled", Contrast.T1C,
     mr(PHILIPS, 3, "T1W_3D_TFE +C", "GR", "SK", 8.1, 3.7, flip=8, acquisition="3D",
        ImageType=PHILIPS_FFE)),
    ("philips DWI b1000", Contrast.OTHER,
     mr(PHILIPS, 1.5, "DWI_SENSE", "SE", "SK", 3500, 90, flip=90, ImageType=PHILIPS_SE,
        DiffusionBValue=1000.0)),
    ("philips DWI b0 looks like a T2", Contrast.OTHER,
     mr(PHILIPS, 1.5, "DWI_SENSE", "SE", "SK", 3500, 90, flip=90, ImageType=PHILIPS_SE)),
    ("philips T2*W_FFE", Contrast.OTHER,
     mr(PHILIPS, 3, "T2*W_FFE", "GR", "SK", 700, 16, flip=18, ImageType=PHILIPS_FFE)),
    ("philips survey", Contrast.OTHER,
     mr(PHILIPS, 3, "Survey", "GR", "SK", 11, 4.6, flip=15, acquisition="3D",
        ImageType=PHILIPS_FFE)),
    # Canon (Vantage brain protocols)
    ("canon T1 SE", Contrast.T1,
     mr(CANON, 1.5, "T1_SE_AX", "SE", "NONE", 500, 10, flip=90)),
    ("canon T2 FSE", Contrast.T2,
     mr(CANON, 3, "T2_FSE_AX", "SE", "SK", 4500, 105, flip=90)),
    ("canon FLAIR", Contrast.FLAIR,
     mr(CANON, 1.5, "FLAIR_AX", ["SE", "IR"], "SK", 10000, 120, ti=2600, flip=90)),
    # The node's own output must never become an input again.
    ("our synthetic T2", Contrast.OTHER,
     mr(SIEMENS, 1.5, "SYNTHETIC T2 from AX T1 SE", "SE", "SK", 4500, 100, flip=90,
        ImageType=["DERIVED", "SECONDARY", "M"])),
    # Enhanced MR, as extract_header lifts it from the functional groups
    ("enhanced MR T2 by AcquisitionContrast", Contrast.T2,
     {"Modality": "MR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.4.1",
        "ImageType": ["ORIGINAL", "PRIMARY", "T2", "NONE"], "AcquisitionContrast": "T2",
        "RepetitionTime": 1500.0, "EchoTime": 45.0, "EchoPulseSequence": "SPIN"}),
    ("enhanced MR diffusion", Contrast.OTHER,
     {"Modality": "MR", "AcquisitionContrast": "DIFFUSION", "RepetitionTime": 4000.0,
        "EchoTime": 80.0}),
]
# fmt: on


@pytest.mark.parametrize(
    ("header", "expected"),
    [pytest.param(header, expected, id=name) for name, expected, header in PROTOCOLS],
)
def test_vendor_protocols(header: dict[str, Any], expected: Contrast) -> None:
    result = classify(header)
    assert result.contrast is expected, result.reason
    assert "tie-break" not in result.reason
    assert result.reason.endswith(f"-> {expected}")


def test_description_cannot_overrule_physics() -> None:
    # A T2 TSE that the technologist named "T1": the header's physics wins.
    header = mr(SIEMENS, 1.5, "AX T1", "SE", "SK", 4500, 100, flip=90)
    assert classify(header).contrast is Contrast.T2


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param({"SeriesDescription": "AX T2"}, Contrast.T2, id="no physics at all"),
        pytest.param(
            {"RepetitionTime": "abc", "EchoTime": None, "SeriesDescription": "SAG T1"},
            Contrast.T1,
            id="garbage TR, TE None",
        ),
        pytest.param(
            mr(SIEMENS, 1.5, "AX T2", "SE", "SK", 1500, 45, flip=90), Contrast.T2, id="mixed TR/TE"
        ),
        pytest.param(
            mr(PHILIPS, 1.5, "T2W_FLAIR", "IR", "SK", 3000, 70, flip=90),
            Contrast.FLAIR,
            id="IR without TI, TR too short to tell",
        ),
        pytest.param(
            mr(SIEMENS, 3, "t1_mprage_sag", "GR", "SK", 2300, 2.98, flip=9, acquisition="3D"),
            Contrast.T1,
            id="MPRAGE whose inversion the header lost",
        ),
    ],
)
def test_description_breaks_ties_and_says_so(header: dict[str, Any], expected: Contrast) -> None:
    result = classify(header)
    assert result.contrast is expected, result.reason
    assert "(tie-break)" in result.reason


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"RepetitionTime": 0, "EchoTime": None, "FlipAngle": "nan", "InversionTime": -5},
        {"RepetitionTime": [], "EchoTime": ["x"], "ScanningSequence": 7, "ImageType": 3},
        {"MagneticFieldStrength": "3T", "SeriesDescription": "", "ContrastBolusAgent": 5},
        {"RepetitionTime": float("inf"), "EchoTime": float("nan"), "SequenceName": None},
    ],
)
def test_garbage_does_not_crash(header: dict[str, Any]) -> None:
    result = classify(header)
    assert result.contrast is Contrast.OTHER
    assert result.reason.endswith("-> OTHER")


T1_SE = mr(SIEMENS, 1.5, "AX T1 SE", "SE", "SK", 500, 12, flip=90)


@pytest.mark.parametrize(
    ("changes", "expected", "evidence"),
    [
        ({}, Contrast.T1, "no contrast agent"),
        ({"ContrastBolusAgent": "Gadobutrol"}, Contrast.T1C, "ContrastBolusAgent 'Gadobutrol'"),
        ({"ContrastBolusAgent": "NONE"}, Contrast.T1, "no contrast agent"),
        ({"ContrastBolusAgent": "n/a"}, Contrast.T1, "no contrast agent"),
        ({"ContrastBolusIngredient": "GADOLINIUM"}, Contrast.T1C, "ContrastBolusIngredient"),
        ({"ContrastBolusVolume": 7.5}, Contrast.T1C, "ContrastBolusVolume 7.5 ml"),
        ({"ContrastBolusVolume": 0.0}, Contrast.T1, "no contrast agent"),
        # No agent in the header (some scanners never fill it): the description hints.
        ({"SeriesDescription": "AX T1 SE +C"}, Contrast.T1C, "suggests post-contrast"),
        ({"SeriesDescription": "T1_SE_POST_GAD"}, Contrast.T1C, "suggests post-contrast"),
        ({"SeriesDescription": "Ax T1 C+"}, Contrast.T1C, "suggests post-contrast"),
        ({"SeriesDescription": "T1 NO CONTRAST"}, Contrast.T1, "no contrast agent"),
        ({"SeriesDescription": "T1 POSTERIOR FOSSA"}, Contrast.T1, "no contrast agent"),
        # The agent copied into every series of the exam: time and description correct it.
        (
            {"ContrastBolusAgent": "Gadovist", "SeriesDescription": "t1_se_tra_pre"},
            Contrast.T1,
            "says pre-contrast",
        ),
        (
            {
                "ContrastBolusAgent": "Gadovist",
                "ContrastBolusStartTime": "101500",
                "AcquisitionTime": "100512.5",
            },
            Contrast.T1,
            "acquired before ContrastBolusStartTime",
        ),
        (
            {
                "ContrastBolusAgent": "Gadovist",
                "ContrastBolusStartTime": "235500",
                "AcquisitionTime": "000310",
            },
            Contrast.T1C,
            "acquired after ContrastBolusStartTime",
        ),
        # Enhanced MR's per-frame flag is definitive.
        (
            {"ContrastBolusAgentAdministered": "NO", "SeriesDescription": "T1 +C"},
            Contrast.T1,
            "ContrastBolusAgentAdministered NO",
        ),
    ],
)
def test_post_contrast_rule(changes: dict[str, Any], expected: Contrast, evidence: str) -> None:
    result = classify(T1_SE | changes)
    assert result.contrast is expected, result.reason
    assert evidence in result.reason


def test_contrast_agent_leaves_t2_and_flair_alone() -> None:
    t2 = mr(SIEMENS, 1.5, "AX T2 TSE +C", "SE", "SK", 4500, 100, ContrastBolusAgent="Gadovist")
    assert classify(t2).contrast is Contrast.T2
    flair = mr(GE, 3, "AX FLAIR POST", ["SE", "IR"], "SK", 9000, 120, ti=2500)
    assert classify(flair | {"ContrastBolusAgent": "GAD"}).contrast is Contrast.FLAIR


EXPECTED_BY_FOLDER = {
    "t1": Contrast.T1,
    "t2": Contrast.T2,
    "flair": Contrast.FLAIR,
    "t1c": Contrast.T1C,
}


def test_every_series_of_the_real_data(mr_brain: Path) -> None:
    # The folder name (NN_contrast) is ground truth for this test only; classify never sees it.
    folders = sorted(path.parent for path in mr_brain.glob("*/*/*.dcm"))
    seen: dict[Path, Classification] = {}
    for folder in dict.fromkeys(folders):
        first = min(folder.glob("*.dcm"))
        header = extract_header(pydicom.dcmread(first, stop_before_pixels=True))
        # The header is stored as JSON; the classification must survive the round trip.
        stored = json.loads(json.dumps(header, allow_nan=False))
        result = classify(stored)
        expected = EXPECTED_BY_FOLDER[folder.name.split("_", 1)[1]]
        assert result.contrast is expected, f"{folder}: {result.reason}"
        assert "tie-break" not in result.reason
        seen[folder] = result
    assert len(seen) == 13
    assert {result.contrast for result in seen.values()} == set(EXPECTED_BY_FOLDER.values())
