"""Which contrast a series has, from the physics in its header.

``classify`` reads the dict of ``pipeline.dicom.header.extract_header`` and decides in this order:

1. Not a weighted image of the brain -> OTHER: another modality or SOP class, DERIVED or
   SECONDARY images (reformats, maps, our own synthetic output), phase/real/imaginary,
   diffusion, echo planar, angiography, and series whose SeriesDescription or ProtocolName
   names a localizer, diffusion, perfusion, SWI/T2*, TOF, STIR, map, spectroscopy...
   A description can take a series out of the inputs here, never put one in.
2. Inversion recovery (IR in ScanningSequence, IR_GEMS, InversionRecovery YES or a TI):
   long TI (>= 1400 ms, fluid nulled) with long TE -> FLAIR, with short TE -> OTHER
   (MP2RAGE second inversion); gradient-echo readout with shorter TI -> T1 (MPRAGE,
   IR-FSPGR/BRAVO, 3D TFE); spin-echo readout with TI under the fat null bound -> OTHER
   (STIR), with intermediate TI and short TE -> T1 (T1-FLAIR).
3. Enhanced MR AcquisitionContrast T1, T2, PROTON_DENSITY, FLUID_ATTENUATED, when given.
4. Spin echo (SE, TSE/FSE): short TR and short TE -> T1, long TR and long TE -> T2,
   long TR and short TE -> PD. Gradient echo: long TE -> OTHER (T2*), fast 2D -> OTHER
   (localizer), high flip at very short TR -> OTHER (balanced SSFP), flip angle at or
   above the Ernst angle of gray matter -> T1, below it -> OTHER (PD/T2*-weighted).
5. Only when 2-4 find the physics missing or ambiguous: SeriesDescription, then
   ProtocolName, as a tie-break, and the reason says so.

A T1 becomes T1C (post-contrast) by, in order: the Enhanced MR ContrastBolusAgentAdministered
flag; the acquisition time against ContrastBolusStartTime when an agent is named; a named
agent (ContrastBolusAgent, ContrastBolusIngredient or a volume), unless the description
says pre-contrast ("PRE", "NATIVE", "W/O"), because some scanners copy the agent into every
series of a contrast exam; with no agent in the header (some scanners never fill it), a
description saying "+C", "POST", "GAD", "GD", "KM", "T1C"... Contrast agent does not
change T2, PD or FLAIR.

Thresholds come from vendor protocols at 1.5 and 3 T (see tests/test_contrast.py) and the
tissue T1 and T2* of the field: gray matter T1 about 1100 ms at 1.5 T, 1450 ms at 3 T,
1950 ms at 7 T; fat nulled at TI about 150-170 ms at 1.5 T, 210-250 ms at 3 T.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.choices import Choice
from pipeline.dicom.values import number_or_none


class Contrast(Choice):
    T1 = "T1"
    T2 = "T2"
    FLAIR = "FLAIR"
    T1C = "T1C"  # T1-weighted after a contrast agent
    PD = "PD"
    OTHER = "OTHER"


class Direction(Choice):
    """What the node synthesizes from what: routes, model cards, training settings and the
    derived series all name it so."""

    T1_TO_T2 = "t1-to-t2"
    T2_TO_T1 = "t2-to-t1"

    @property
    def source(self) -> Contrast:
        return Contrast.T1 if self is Direction.T1_TO_T2 else Contrast.T2

    @property
    def target(self) -> Contrast:
        return Contrast.T2 if self is Direction.T1_TO_T2 else Contrast.T1

    @property
    def target_family(self) -> frozenset[Contrast]:
        """The target and its variants (FLAIR is a T2, T1C a T1): a series of one of these
        as the source would ask the model for the contrast the series already has."""
        if self is Direction.T1_TO_T2:
            return frozenset({Contrast.T2, Contrast.FLAIR})
        return frozenset({Contrast.T1, Contrast.T1C})

    @classmethod
    def for_source(cls, contrast: Contrast) -> Direction | None:
        """The direction that synthesizes from a series of this contrast, if any."""
        return {Contrast.T1: cls.T1_TO_T2, Contrast.T2: cls.T2_TO_T1}.get(contrast)


@dataclass(frozen=True)
class Classification:
    contrast: Contrast
    reason: str  # the header facts that decided it, for the admin and the logs


@dataclass(frozen=True)
class _Field:
    """Thresholds that move with the main field."""

    gray_matter_t1: float  # ms, sets the Ernst angle of spoiled gradient echo
    t1_tr_max: float  # ms, longest TR that still gives T1 weighting with spin echo
    t2star_te_min: float  # ms, gradient echo from here on is T2*-weighted
    stir_ti_max: float  # ms, TIs below this null fat (STIR)


_LOW_FIELD = _Field(gray_matter_t1=1100, t1_tr_max=1000, t2star_te_min=15, stir_ti_max=300)
_HIGH_FIELD = _Field(gray_matter_t1=1450, t1_tr_max=1200, t2star_te_min=10, stir_ti_max=300)
_ULTRA_FIELD = _Field(gray_matter_t1=1950, t1_tr_max=1500, t2star_te_min=8, stir_ti_max=450)

TR_LONG_MIN = 2000.0  # ms: T2 and PD need most of the longitudinal recovery done
TE_LONG_MIN = 60.0  # ms: T2 weighting (brain T2 is 70-100 ms)
TE_SHORT_MAX = 35.0  # ms: T1 and PD weighting
FLAIR_TI_MIN = 1400.0  # ms: fluid nulling; 3D FLAIR uses 1600-1900, 2D FLAIR 2000-2800
FLAIR_GUESS_TR_MIN = 4500.0  # ms: IR without TI; FLAIR has TR and TE above STIR's
FLAIR_GUESS_TE_MIN = 80.0
SSFP_TR_MAX = 15.0  # ms: balanced SSFP runs at TR 3-8 ms with flips of 40-80 degrees
SSFP_FLIP_MIN = 35.0
SPOILED_FLIP_MIN = 6.0  # degrees: below, spoiled gradient echo is proton-density weighted
LOCALIZER_TR_MAX = 30.0  # ms: a 2D gradient echo this fast is a localizer or calibration
PREPARED_TR_MIN = 1000.0  # ms: gradient echo with such TR is a prepared 3D sequence

_MR_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    }
)

# ImageType values (3rd and later) of images that are not a plain magnitude acquisition:
# Siemens (P, DIFFUSION, ADC, TRACEW, SWI, MIP), Philips (P_FFE, PROJECTION IMAGE),
# GE (REFORMATTED, PHASE), and the standard's enhanced values.
_NOT_WEIGHTED_IMAGE_TYPES = frozenset(
    {
        "P",
        "R",
        "I",
        "PHASE",
        "REAL",
        "IMAGINARY",
        "PHASE MAP",
        "DIFFUSION",
        "DWI",
        "ADC",
        "EADC",
        "TRACEW",
        "FA",
        "PERFUSION",
        "ASL",
        "CBF",
        "CBV",
        "MTT",
        "TTP",
        "FMRI",
        "MOCO",
        "SWI",
        "MIP",
        "MINIP",
        "MNIP",
        "MPR",
        "REFORMATTED",
        "PROJECTION IMAGE",
        "SUBTRACTION",
        "LOCALIZER",
        "SCOUT",
        "DIXON",
        "WATER",
        "FAT",
        "IN_PHASE",
        "OUT_PHASE",
        "OPP_PHASE",
        "T1 MAP",
        "T2 MAP",
        "T2_STAR_MAP",
        # Enhanced MR image flavors that are not a T1/T2/PD/FLAIR weighting
        "ANGIO",
        "TOF",
        "MAX_IP",
        "MIN_IP",
        "T2_STAR",
        "STIR",
        "VELOCITY",
        "TAGGING",
        "METABOLITE_MAP",
    }
)
_PHILIPS_COMPLEX_PREFIXES = ("P_", "R_", "I_")  # P_FFE, R_SE, I_IR: phase, real, imaginary

_ACQUISITION_CONTRAST_WEIGHTINGS = {
    "T1": Contrast.T1,
    "T2": Contrast.T2,
    "PROTON_DENSITY": Contrast.PD,
    "FLUID_ATTENUATED": Contrast.FLAIR,
}
_ACQUISITION_CONTRAST_OTHER = frozenset(
    {
        "DIFFUSION",
        "FLOW_ENCODED",
        "PERFUSION",
        "STIR",
        "TAGGING",
        "T2_STAR",
        "TOF",
        "MIXED",  # several contrasts in one object: none of them is the series' contrast
    }
)

# Descriptions are matched after _words(): upper case, separators turned into spaces.
_DESCRIPTION_NOT_INPUT = (
    (r"\bDWI\b|DIFFUS|\bDIFF\b|\bDTI\b|\bTRACEW?\b|\bADC\b|\bEP2D|\bEPI", "diffusion or EPI"),
    (r"PERF|\bDSC\b|\bDCE\b|\b(P|PC)?C?ASL\b|\bBOLD\b|FMRI|RESTING", "perfusion or fMRI"),
    (r"\bSWI|\bSWAN\b|\bT2 ?(\*|STAR\b)|\bT2W? ?FFE\b|HEMO|\bMEDIC\b", "T2* or SWI"),
    (r"\bTOF\b|\bMRA\b|\bMRV\b|ANGIO|VENO", "angiography"),
    (
        r"LOCALI[SZ]ER|\bLOC\b|SCOUT|SURVEY|PILOT|\b3 ?PL(ANE)?\b|CALIBRAT|\bCAL\b|REF ?SCAN",
        "a localizer or calibration",
    ),
    (r"\bCISS\b|FIESTA|\bTRUFI|\bBFFE\b|\bDRIVE\b|\bSSFP\b", "steady-state free precession"),
    (r"\bSTIR\b", "STIR"),
    (r"\bMAPS?\b|MAPPING|RELAXOMETRY|\bMDME\b|\bMAGIC\b|\bQALAS\b|SYNTHETIC", "a map or synthetic"),
    (r"SPECTRO|\bMRS\b|\bSVS\b|\bCSI\b|\bPRESS\b", "spectroscopy"),
    (r"\bMIP\b|\bMINIP\b|\bSUB\b|\bMOCO\b|\bPHA(SE)?\b|DIXON", "a processed image"),
)
_DESCRIPTION_WEIGHTINGS = (
    # Philips prefixes names with "s" or "3D" (sT1W_3D_TFE, 3DT1): hence (S|3D)?.
    (r"\b(S|3D)?T1.*FLAIR|FLAIR.*\b(S|3D)?T1", Contrast.T1),  # T1-FLAIR is T1-weighted
    (r"FLAIR|DARK ?FLUID", Contrast.FLAIR),
    (r"\b(S|3D)?T2", Contrast.T2),
    (r"\b(S|3D)?PDW?I?\b|PROTON", Contrast.PD),
    (r"\b(S|3D)?T1|MP ?RAGE|SPGR|BRAVO|\bTFE\b|VIBE|LAVA", Contrast.T1),
)
_DESCRIPTION_PRE = (
    r"\bPRE\b|\bPRECONTRAST|\bNATIVE?\b|\bNON ?CONTRAST|\bNO (CONTRAST|GAD|GD)\b|"
    r"\bW ?O\b|\bWITHOUT\b"
)
_DESCRIPTION_POST = (
    r"\+ ?(C|GD|GAD\w*|KM|CONTRAST)\b|\bC ?\+|\bPOST\b|\bPOSTCONTRAST|\bPOST ?(GAD|GD|C)\b|"
    r"\bGAD|\bGD\b|\bKM\b|\bCE\b|\bT1 ?(C|CE|GD|POST)\b|\bCONTRAST\b|\bENHANCED\b"
)
_NO_AGENT = frozenset(
    {"", "NONE", "NO", "N", "NA", "N A", "0", "NIL", "NULL", "UNKNOWN", "NOT GIVEN", "WITHOUT"}
)


def classify(header: Mapping[str, Any]) -> Classification:
    """The contrast of the series whose header (from extract_header) is ``header``."""
    facts = _Facts.read(header)
    not_input = _not_a_weighted_image(facts)
    if not_input is not None:
        return Classification(Contrast.OTHER, f"{not_input} -> OTHER")
    weighting, why = _weighting(facts)
    if weighting is None:
        weighting, why = _tie_break(facts, why)
    if weighting is Contrast.T1:
        post, agent = _post_contrast(facts)
        weighting = Contrast.T1C if post else Contrast.T1
        why = f"{why}; {agent}"
    return Classification(weighting, f"{why} -> {weighting}")


@dataclass(frozen=True)
class _Facts:
    header: Mapping[str, Any]
    tr: float | None
    te: float | None
    ti: float | None
    flip: float | None
    field: _Field
    tesla: float | None
    scanning: frozenset[str]
    variant: frozenset[str]
    options: frozenset[str]
    readout: str | None  # "SE" or "GR"

    @classmethod
    def read(cls, header: Mapping[str, Any]) -> _Facts:
        tesla = _number(header.get("MagneticFieldStrength"))
        if tesla is not None and tesla > 100:
            tesla /= 10000  # older GE systems write gauss (15000)
        te = _number(header.get("EchoTime"))
        scanning = _tokens(header.get("ScanningSequence"))
        echo = _text(header.get("EchoPulseSequence"))
        if "SE" in scanning or echo in ("SPIN", "BOTH"):
            readout = "SE"
        elif "GR" in scanning or echo == "GRADIENT" or (te is not None and te < 6):
            readout = "GR"  # no spin echo is shorter than about 6 ms
        else:
            readout = None
        return cls(
            header=header,
            tr=_number(header.get("RepetitionTime")),
            te=te,
            ti=_number(header.get("InversionTime")),
            flip=_number(header.get("FlipAngle")),
            field=_field(tesla),
            tesla=tesla,
            scanning=scanning,
            variant=_tokens(header.get("SequenceVariant")),
            options=_tokens(header.get("ScanOptions")),
            readout=readout,
        )

    @property
    def inversion(self) -> bool:
        flagged = _text(self.header.get("InversionRecovery")) == "YES"
        return flagged or "IR" in self.scanning or "IR_GEMS" in self.options or bool(self.ti)

    def describe(self) -> str:
        parts = [
            {"SE": "spin echo", "GR": "gradient echo"}.get(self.readout or "", "readout unknown")
        ]
        if self.inversion:
            parts[0] += " with inversion"
        for name, value, unit in (
            ("TR", self.tr, " ms"),
            ("TE", self.te, " ms"),
            ("TI", self.ti, " ms"),
            ("flip", self.flip, "°"),
        ):
            if value is not None:
                parts.append(f"{name} {value:g}{unit}")
        if self.tesla is not None:
            parts.append(f"{self.tesla:g} T")
        return ", ".join(parts)


def _not_a_weighted_image(facts: _Facts) -> str | None:
    """Why the series is not a T1/T2/PD/FLAIR image at all, or None."""
    header = facts.header
    modality = _text(header.get("Modality"))
    if modality and modality != "MR":
        return f"Modality {modality} is not MR"
    sop_class = _text(header.get("SOPClassUID"))
    if sop_class and sop_class not in _MR_IMAGE_SOP_CLASSES:
        return f"SOP class {sop_class} is not an MR image"
    image_type = [_text(value) for value in _list(header.get("ImageType"))]
    shown = "\\".join(image_type)
    if image_type[:1] == ["DERIVED"] or image_type[1:2] == ["SECONDARY"]:
        return f"ImageType {shown}: derived, not acquired"
    for value in image_type[2:]:
        if value in _NOT_WEIGHTED_IMAGE_TYPES or value.startswith(_PHILIPS_COMPLEX_PREFIXES):
            return f"ImageType {shown}: {value}, not a plain magnitude acquisition"
    component = _text(header.get("ComplexImageComponent"))
    if component and component != "MAGNITUDE":
        return f"ComplexImageComponent {component}"
    label = _text(header.get("AcquisitionContrast"))
    if label in _ACQUISITION_CONTRAST_OTHER:
        return f"AcquisitionContrast {label}"
    b_value = _number(header.get("DiffusionBValue"))
    directionality = _text(header.get("DiffusionDirectionality"))
    if b_value or directionality in ("DIRECTIONAL", "ISOTROPIC", "BMATRIX"):
        return "diffusion weighted (DiffusionBValue/DiffusionDirectionality)"
    names = [_text(header.get("SequenceName")), _text(header.get("PulseSequenceName"))]
    if (
        "EP" in facts.scanning
        or _text(header.get("EchoPlanarPulseSequence")) == "YES"
        or any(option.startswith("EPI") for option in facts.options)
        or any(re.match(r"\*?EP", name) for name in names)
    ):
        return "echo planar (diffusion, perfusion or BOLD)"
    if _text(header.get("AngioFlag")) == "Y":
        return "AngioFlag Y (angiography)"
    for pattern, what in _DESCRIPTION_NOT_INPUT:
        found = _hint(facts, pattern)
        if found:
            return f"{found} names {what}"
    return None


def _weighting(facts: _Facts) -> tuple[Contrast | None, str]:
    """The weighting by the physics, or None with why the physics does not decide."""
    described = facts.describe()
    rule = ""
    if facts.inversion:
        weighting, rule = _inversion(facts)
        if weighting is not None:
            return weighting, f"{described}: {rule}"
    label = _text(facts.header.get("AcquisitionContrast"))
    if label in _ACQUISITION_CONTRAST_WEIGHTINGS:
        return _ACQUISITION_CONTRAST_WEIGHTINGS[label], f"{described}, AcquisitionContrast {label}"
    if facts.inversion:
        return None, f"{described}: {rule}"
    if facts.readout == "GR":
        weighting, rule = _gradient_echo(facts)
    else:
        weighting, rule = _spin_echo(facts)
    return weighting, f"{described}: {rule}"


def _inversion(facts: _Facts) -> tuple[Contrast | None, str]:
    ti, te, tr = facts.ti, facts.te, facts.tr
    if ti is not None and ti >= FLAIR_TI_MIN:
        if te is None:
            return None, "long TI but no TE"
        if te >= TE_LONG_MIN:
            return Contrast.FLAIR, "long TI nulls fluid, long TE"
        return Contrast.OTHER, "long TI with short TE (e.g. MP2RAGE 2nd inversion)"
    if facts.readout == "GR":
        if te is None or te <= TE_SHORT_MAX:
            return Contrast.T1, "inversion-prepared gradient echo (MPRAGE, IR-SPGR, TFE)"
        return Contrast.OTHER, "inversion-prepared gradient echo with long TE"
    if ti is None:
        if tr and te and tr >= FLAIR_GUESS_TR_MIN and te >= FLAIR_GUESS_TE_MIN:
            return Contrast.FLAIR, "no TI, but TR and TE are FLAIR's, beyond STIR's"
        return None, "inversion without TI: FLAIR, STIR or T1-FLAIR cannot be told apart"
    if ti < facts.field.stir_ti_max:
        return Contrast.OTHER, f"TI below {facts.field.stir_ti_max:g} ms nulls fat (STIR)"
    if te is None:
        return None, "intermediate TI but no TE"
    if te <= TE_SHORT_MAX:
        return Contrast.T1, "TI between fat and fluid null, short TE (T1-FLAIR)"
    return Contrast.OTHER, "intermediate TI with long TE"


def _spin_echo(facts: _Facts) -> tuple[Contrast | None, str]:
    tr, te = facts.tr, facts.te
    if tr is None or te is None:
        return None, "TR or TE missing"
    if facts.readout is None:
        # A gradient echo can look like a T1 or PD spin echo; only T2 is unmistakable.
        if tr >= TR_LONG_MIN and te >= TE_LONG_MIN:
            return Contrast.T2, "long TR, long TE"
        return None, "readout unknown and TR/TE do not rule out a gradient echo"
    if tr <= facts.field.t1_tr_max and te <= TE_SHORT_MAX:
        return Contrast.T1, "short TR, short TE"
    if tr >= TR_LONG_MIN and te >= TE_LONG_MIN:
        return Contrast.T2, "long TR, long TE"
    if tr >= TR_LONG_MIN and te <= TE_SHORT_MAX:
        return Contrast.PD, "long TR, short TE"
    return None, "TR and TE give a mixed weighting"


def _gradient_echo(facts: _Facts) -> tuple[Contrast | None, str]:
    tr, te, flip = facts.tr, facts.te, facts.flip
    if tr is None or te is None:
        return None, "TR or TE missing"
    if te >= facts.field.t2star_te_min:
        return Contrast.OTHER, f"TE from {facts.field.t2star_te_min:g} ms: T2*-weighted"
    acquisition = _text(facts.header.get("MRAcquisitionType"))
    if acquisition == "2D" and tr < LOCALIZER_TR_MAX:
        return Contrast.OTHER, "fast 2D gradient echo (localizer or calibration)"
    if "MP" in facts.variant:
        return Contrast.T1, "magnetization-prepared gradient echo, short TE"
    if flip is None:
        return None, "no flip angle"
    if tr <= SSFP_TR_MAX and flip >= SSFP_FLIP_MIN:
        return Contrast.OTHER, "high flip at very short TR (balanced SSFP, T2/T1 contrast)"
    if tr >= PREPARED_TR_MIN:
        return None, "TR this long with a gradient echo implies a preparation not named"
    ernst = math.degrees(math.acos(math.exp(-tr / facts.field.gray_matter_t1)))
    if flip >= max(SPOILED_FLIP_MIN, ernst):
        return Contrast.T1, f"flip at or above gray matter's Ernst angle ({ernst:.0f}°)"
    return Contrast.OTHER, f"flip below gray matter's Ernst angle ({ernst:.0f}°): PD/T2*"


def _tie_break(facts: _Facts, why: str) -> tuple[Contrast, str]:
    for pattern, weighting in _DESCRIPTION_WEIGHTINGS:
        found = _hint(facts, pattern)
        if found:
            return weighting, f"{why}; {found} suggests {weighting} (tie-break)"
    return Contrast.OTHER, f"{why}; no description to break the tie"


def _post_contrast(facts: _Facts) -> tuple[bool, str]:
    """Whether a T1 was acquired after a contrast agent, and the evidence."""
    header = facts.header
    administered = _text(header.get("ContrastBolusAgentAdministered"))
    if administered in ("YES", "NO"):
        return administered == "YES", f"ContrastBolusAgentAdministered {administered}"
    agent = _agent(header)
    if agent is None:
        post = _hint(facts, _DESCRIPTION_POST)
        if post and not _hint(facts, _DESCRIPTION_PRE):
            return True, f"no contrast agent in the header, but {post} suggests post-contrast"
        return False, "no contrast agent"
    after = _acquired_after_bolus(header)
    if after is not None:
        return after, f"{agent}, acquired {'after' if after else 'before'} ContrastBolusStartTime"
    pre = _hint(facts, _DESCRIPTION_PRE)
    if pre:
        return False, f"{agent}, but {pre} says pre-contrast (agent copied to the exam)"
    return True, agent


def _agent(header: Mapping[str, Any]) -> str | None:
    for keyword in ("ContrastBolusAgent", "ContrastBolusIngredient"):
        value = header.get(keyword)
        if isinstance(value, str) and _words(value) not in _NO_AGENT:
            return f"{keyword} {value!r}"
    volume = _number(header.get("ContrastBolusVolume"))
    return f"ContrastBolusVolume {volume:g} ml" if volume else None


def _acquired_after_bolus(header: Mapping[str, Any]) -> bool | None:
    start = _seconds(header.get("ContrastBolusStartTime"))
    acquired = _seconds(header.get("AcquisitionTime"))
    if not start or acquired is None:  # a start at 00:00:00 is a placeholder
        return None
    # Modulo a day, so an exam across midnight still compares right.
    return (acquired - start) % 86400 < 43200


def _seconds(value: Any) -> float | None:
    """Seconds since midnight of a DICOM TM (HHMMSS.FFFFFF, or HH:MM:SS of old writers)."""
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"(\d\d):?(\d\d)?:?(\d\d(?:\.\d+)?)?", value.strip())
    if not match:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


def _hint(facts: _Facts, pattern: str) -> str | None:
    """Where the description says ``pattern``: "SeriesDescription 'x'", or None."""
    for keyword in ("SeriesDescription", "ProtocolName"):
        value = facts.header.get(keyword)
        if isinstance(value, str) and re.search(pattern, _words(value)):
            return f"{keyword} {value!r}"
    return None


def _field(tesla: float | None) -> _Field:
    # Unknown field: the 1.5 T thresholds, the more cautious for T1 by flip angle.
    if tesla is None or tesla <= 2:
        return _LOW_FIELD
    return _HIGH_FIELD if tesla <= 4 else _ULTRA_FIELD


def _words(text: str) -> str:
    return " ".join(re.split(r"[^A-Z0-9+*]+", text.upper())).strip()


def _number(value: Any) -> float | None:
    """A positive number from a header value (the first of several), else None: a TR, TE or
    field strength of 0 is a placeholder."""
    number = number_or_none(value)
    return number if number is not None and number > 0 else None


def _list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return value.split("\\")
    return []


def _tokens(value: Any) -> frozenset[str]:
    return frozenset(_text(item) for item in _list(value))


def _text(value: Any) -> str:
    return value.strip().upper() if isinstance(value, str) else ""
