"""Building and writing the synthetic series: one MR Image instance per source slice.

A multi-frame (Enhanced MR) source gives one classic MR Image per frame, each naming its
frame in its Source Image Sequence: every PACS and viewer takes classic images, and the
synthetic slices stay beside the frames they were computed from.

``build_synthetic_series`` is the one place that decides every attribute of the output, so
that what a viewer, a PACS or a validator sees can be read in one function: as highdicom
builds its objects, one ``_add_*`` step per module of the MR Image IOD. The choices:

- Marked synthetic wherever readers look: ImageType DERIVED\\SECONDARY\\OTHER\\SYNTHETIC
  (value 3 OTHER is the MR defined term for "none of the listed derivations"; value 4 is
  implementation specific), a SeriesDescription starting with SYNTHETIC,
  DerivationDescription, ImageComments, Manufacturer "dicomnode" with the model as
  ManufacturerModelName, and a Contributing Equipment item coded
  (109100, DCM, "Synthesizing Equipment") carrying the model's name, version and checksum;
  the source's scanner follows as (109101, DCM, "Acquisition Equipment") when it is named.
  Synthetic Data (0008,001C) YES, the attribute the standard added for exactly this. The
  dicom3tools in Debian (2022) do not know it yet and say so (one error naming the tag,
  which the tests accept and nothing else).
- A "SYNTHETIC" label burnt into the air outside the head (``pipeline.dicom.label``, on by
  default) makes BurnedInAnnotation YES: a screenshot or print still says it.
- No DerivationCodeSequence: CID 7203 has no code for contrast synthesis, and the near ones
  (multiplanar reformatting, spatial resampling) would describe a different operation.
- Acquisition parameters are not copied: no acquisition produced these pixels. The MR Image
  module still requires some of them, so they get the values that claim nothing:
  ScanningSequence RM (research mode; the enumerated values have no "none" and the others
  name a physical readout), SequenceVariant NONE, and empty Type 2 values for ScanOptions,
  MRAcquisitionType, RepetitionTime, EchoTime and EchoTrainLength. A contrast classifier
  reading this header therefore finds no T1 or T2 physics in it.
- Patient, study, frame of reference and each slice's geometry are copied unchanged, so the
  series sits in the source's study and a viewer links it slice by slice with the source.
- Pixels: MONOCHROME2, 16 bits allocated, unsigned, no RescaleSlope/Intercept: the stored
  values are the synthetic intensities themselves and have no unit to rescale to. Window
  center and width come from the caller, explained as "SYNTHETIC T1/T2".
- LossyImageCompression is 00 unless any source image was lossy compressed (its header says
  01 or it arrived in a lossy JPEG transfer syntax): the loss carries over to what is derived.
- SeriesNumber is the source's plus 1000 (empty when the source has none or the sum leaves
  the IS range), which sorts synthetic series after the acquired ones in most viewers.
- InstanceNumbers are 1..S in the order of the source's InstanceNumbers, so slice k of the
  synthetic series lies beside slice k of its source when a viewer pages by number.
- UIDs are derived from the source UIDs and the model's identity: a re-run replaces its
  earlier output in the PACS instead of adding a copy; a new model makes a new series.
"""

from __future__ import annotations

import copy
import enum
import io
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    MRImageStorage,
)

from pipeline.dicom.contrast import Contrast
from pipeline.dicom.values import check_uid
from pipeline.dicom.volume import Volume
from pipeline.files import write_atomically

# What the models synthesize: a Direction's target.
SYNTHESIZED = (Contrast.T1, Contrast.T2)
SERIES_NUMBER_OFFSET = 1000
UNCERTAINTY_SERIES_NUMBER_OFFSET = 2000


class DerivedKind(enum.StrEnum):
    """What a derived series shows: the synthetic image, or its per-voxel uncertainty
    (marked as synthetic the same way, and described as the uncertainty)."""

    SYNTHETIC = "synthetic"
    UNCERTAINTY = "uncertainty"


_IS_MAX = 2**31 - 1
_LO_MAX, _ST_MAX = 64, 1024

_PATIENT = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "EthnicGroup",
    "PatientComments",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "QualityControlSubject",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
)
_PATIENT_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_STUDY = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "ReferencedStudySequence",
    "RequestingService",
    # Patient Study
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    # Clinical Trial Study
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
)
_STUDY_TYPE_2 = ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Series attributes that describe the patient and the order, not the acquisition.
_SERIES = (
    "BodyPartExamined",
    "Laterality",
    "AnatomicalOrientationType",
    "RequestAttributesSequence",
)
# The contrast agent was in the patient when the source was acquired, so it is in this image.
_CONTRAST_BOLUS = (
    "ContrastBolusAgent",
    "ContrastBolusAgentSequence",
    "ContrastBolusRoute",
    "ContrastBolusAdministrationRouteSequence",
    "ContrastBolusVolume",
    "ContrastBolusStartTime",
    "ContrastBolusStopTime",
    "ContrastBolusTotalDose",
    "ContrastFlowRate",
    "ContrastFlowDuration",
    "ContrastBolusIngredient",
    "ContrastBolusIngredientConcentration",
)
_PLANE = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceLocation",
    "SpacingBetweenSlices",
)
_LOSSY_SYNTAXES = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless)
# Fixed forever: changing it would change every output UID and duplicate series in PACS.
_UID_NAMESPACE = uuid.UUID("6f1c5f0e-3d0b-5a59-9d1e-8a8f2b6c4d21")


@dataclass(frozen=True)
class ModelIdentity:
    """What made the pixels: enough to find the exact model file again."""

    name: str
    version: str
    checksum: str


def derived_series_uid(
    source_series_uid: str, model: ModelIdentity, kind: DerivedKind = DerivedKind.SYNTHETIC
) -> str:
    """The synthetic series' UID: the same for the same source series and model."""
    names = ["series", source_series_uid, model.name, model.version, model.checksum]
    return _derived_uid(*names, *_kind_names(kind))


def derived_instance_uid(
    source_sop_instance_uid: str,
    model: ModelIdentity,
    frame: int | None = None,
    kind: DerivedKind = DerivedKind.SYNTHETIC,
) -> str:
    """The synthetic instance's UID: the same for the same source instance (and frame, in a
    multi-frame source) and model."""
    names = ["instance", source_sop_instance_uid, model.name, model.version, model.checksum]
    if frame is not None:
        names.append(f"frame {frame}")
    return _derived_uid(*names, *_kind_names(kind))


def _kind_names(kind: DerivedKind) -> tuple[str, ...]:
    # The synthetic series keeps the UIDs it always had; the others get their own.
    return () if kind is DerivedKind.SYNTHETIC else (kind.value,)


def _derived_uid(*names: str) -> str:
    # 2.25.<name-based UUID> (PS3.5 B.2): valid under no organisation's root and reproducible.
    # pydicom's generate_uid ignores its entropy sources when the prefix is 2.25, and joins
    # them without a separator; JSON keeps ("ab", "c") and ("a", "bc") apart.
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, json.dumps(names)).int}"


def build_synthetic_series(
    source: Volume,
    pixels: np.ndarray,
    *,
    bits_stored: int,
    window_center: float,
    window_width: float,
    target_contrast: Contrast,
    model: ModelIdentity,
    software_version: str,
    burned_in: bool = False,
    kind: DerivedKind = DerivedKind.SYNTHETIC,
    caution: str = "",
) -> list[Dataset]:
    """Build one MR Image instance per slice of ``source``, holding ``pixels`` (uint16, S,H,W).

    ``pixels`` are in the volume's slice order; values must fit in ``bits_stored`` bits.
    ``burned_in``: the pixels carry a burnt-in label (BurnedInAnnotation YES).
    ``caution``: what a reader must know of the model's limits, after the ImageComments'
    "not acquired".
    Raises ValueError when the pixels or arguments do not fit the source.
    """
    _check_arguments(source, pixels, bits_stored, target_contrast)
    first = source.headers[0]
    series = _SyntheticSeries(
        uid=derived_series_uid(first.SeriesInstanceUID, model, kind),
        created=datetime.now(),
        source_description=_describe(first),
        # A source without a frame of reference still needs one shared by all its derived
        # series.
        frame_of_reference=_derived_uid("frame-of-reference", first.SeriesInstanceUID),
        lossy=any(_was_lossy_compressed(header) for header in source.headers),
        contrast=target_contrast,
        model=model,
        software_version=software_version,
        burned_in=burned_in,
        kind=kind,
        caution=caution,
    )
    numbers = instance_numbers(source.headers)
    frames = source.frames or (None,) * len(source.headers)
    datasets = []
    for index, (header, frame) in enumerate(zip(source.headers, frames, strict=True)):
        ds = Dataset()
        _add_sop_common(ds, header, frame, series)
        _add_patient_and_study(ds, header)
        _add_general_series(ds, header, series)
        _add_frame_of_reference(ds, header, series)
        _add_general_equipment(ds, series)
        _add_general_image(ds, header, frame, numbers[index], series)
        _add_image_plane(ds, header)
        _copy(ds, header, _CONTRAST_BOLUS)
        _add_mr_image(ds)
        _add_image_pixel(ds, pixels[index], bits_stored)
        _add_voi_lut(ds, window_center, window_width, series)
        _add_common_instance_reference(ds, header)
        _add_file_meta(ds)
        datasets.append(ds)
    return datasets


@dataclass(frozen=True)
class _SyntheticSeries:
    """What every instance of one synthetic series shares."""

    uid: str
    created: datetime
    source_description: str
    frame_of_reference: str  # for a source without one
    lossy: bool  # any source image was lossy compressed
    contrast: Contrast
    model: ModelIdentity
    software_version: str
    burned_in: bool
    kind: DerivedKind
    caution: str

    @property
    def title(self) -> str:
        """SYNTHETIC T2, or SYNTHETIC T2 UNCERTAINTY: how every text field names it."""
        if self.kind is DerivedKind.UNCERTAINTY:
            return f"SYNTHETIC {self.contrast} UNCERTAINTY"
        return f"SYNTHETIC {self.contrast}"

    @property
    def date(self) -> str:
        return self.created.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        return self.created.strftime("%H%M%S")


def _add_sop_common(
    ds: Dataset, header: Dataset, frame: int | None, series: _SyntheticSeries
) -> None:
    _copy(ds, header, ("SpecificCharacterSet", "TimezoneOffsetFromUTC"))
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = derived_instance_uid(
        header.SOPInstanceUID, series.model, frame, series.kind
    )
    ds.InstanceCreationDate = series.date
    ds.InstanceCreationTime = series.time
    ds.ContributingEquipmentSequence = DicomSequence([_synthesizing_equipment(series)])
    # Manufacturer is Type 1 in this sequence: an unnamed scanner cannot be listed.
    if header.get("Manufacturer"):
        ds.ContributingEquipmentSequence.append(_acquisition_equipment(header))


def _add_patient_and_study(ds: Dataset, header: Dataset) -> None:
    """Patient, Clinical Trial Subject, General Study, Patient Study: the source's."""
    _copy(ds, header, _PATIENT, _PATIENT_TYPE_2)
    _copy(ds, header, _STUDY, _STUDY_TYPE_2)


def _add_general_series(ds: Dataset, header: Dataset, series: _SyntheticSeries) -> None:
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = _series_number(header.get("SeriesNumber"), series.kind)
    ds.SeriesDate = series.date
    ds.SeriesTime = series.time
    ds.SeriesDescription = _truncate(f"{series.title} from {series.source_description}", _LO_MAX)
    _copy(ds, header, _SERIES)
    _copy(ds, header, ("PatientPosition",), ("PatientPosition",))


def _add_frame_of_reference(ds: Dataset, header: Dataset, series: _SyntheticSeries) -> None:
    ds.FrameOfReferenceUID = header.get("FrameOfReferenceUID") or series.frame_of_reference
    ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "")


def _add_general_equipment(ds: Dataset, series: _SyntheticSeries) -> None:
    """This equipment made the series; the scanner is a contributor (SOP Common)."""
    ds.Manufacturer = "dicomnode"
    ds.ManufacturerModelName = _truncate(series.model.name, _LO_MAX)
    ds.SoftwareVersions = _software_versions(series)


def _add_general_image(
    ds: Dataset, header: Dataset, frame: int | None, number: int, series: _SyntheticSeries
) -> None:
    """General Image and General Reference: marked derived, referencing its source."""
    model, contrast = series.model, series.contrast
    ds.InstanceNumber = number
    ds.ContentDate = series.date
    ds.ContentTime = series.time
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "SYNTHETIC"]
    ds.SyntheticData = "YES"
    what = f"Synthetic {contrast}-weighted image"
    if series.kind is DerivedKind.UNCERTAINTY:
        what = (
            f"Per-voxel uncertainty (Monte-Carlo dropout standard deviation) of the synthetic "
            f"{contrast}-weighted image, not an image of anatomy,"
        )
    ds.DerivationDescription = _truncate(
        f"{what} computed from {series.source_description} by "
        f"model {model.name} version {model.version} (checksum {model.checksum}); "
        "not acquired by a scanner",
        _ST_MAX,
    )
    comments = f"{series.title}: computed by {model.name} {model.version}, not acquired."
    ds.ImageComments = f"{comments} {series.caution}" if series.caution else comments
    ds.SourceImageSequence = DicomSequence([_source_image(header, frame)])
    ds.BurnedInAnnotation = "YES" if series.burned_in else "NO"
    # A synthetic image is not itself compressed, but lossy loss in its input carries over.
    ds.LossyImageCompression = "01" if series.lossy else "00"
    if series.lossy:
        _copy(ds, header, ("LossyImageCompressionRatio", "LossyImageCompressionMethod"))


def _add_image_plane(ds: Dataset, header: Dataset) -> None:
    """Slice by slice as the source, so a viewer links the two."""
    _copy(ds, header, _PLANE)
    ds.SliceThickness = header.get("SliceThickness", "")


def _add_mr_image(ds: Dataset) -> None:
    """Acquisition parameters that claim no acquisition: see the module docstring."""
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = ""
    ds.RepetitionTime = ""
    ds.EchoTime = ""
    ds.EchoTrainLength = ""


def _add_image_pixel(ds: Dataset, pixels: np.ndarray, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = (int(size) for size in pixels.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _add_voi_lut(
    ds: Dataset, window_center: float, window_width: float, series: _SyntheticSeries
) -> None:
    ds.WindowCenter = f"{window_center:.6g}"
    ds.WindowWidth = f"{window_width:.6g}"
    ds.WindowCenterWidthExplanation = series.title


def _add_common_instance_reference(ds: Dataset, header: Dataset) -> None:
    """The source series of the referenced source image."""
    reference = Dataset()
    reference.SeriesInstanceUID = header.SeriesInstanceUID
    reference.ReferencedInstanceSequence = DicomSequence([_referenced_instance(header)])
    ds.ReferencedSeriesSequence = DicomSequence([reference])


def _add_file_meta(ds: Dataset) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of ``dataset``: preamble, file meta, Explicit VR Little Endian."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def write_series(datasets: Iterable[Dataset], folder: Path) -> list[Path]:
    """Write each dataset atomically as ``folder/<SOPInstanceUID>.dcm``; return the paths."""
    paths = []
    for dataset in datasets:
        path = folder / f"{check_uid(str(dataset.SOPInstanceUID), 'SOP Instance UID')}.dcm"
        write_atomically(path, encode(dataset))
        paths.append(path)
    return paths


def _check_arguments(
    source: Volume, pixels: np.ndarray, bits_stored: int, target_contrast: Contrast
) -> None:
    if target_contrast not in SYNTHESIZED:
        raise ValueError(
            f"target contrast '{target_contrast}' is not one of {', '.join(SYNTHESIZED)}"
        )
    if pixels.dtype != np.uint16:
        raise ValueError(f"synthetic pixels must be uint16, not {pixels.dtype}")
    if pixels.shape != source.pixels.shape:
        raise ValueError(
            f"synthetic pixels have shape {pixels.shape}; the source has {source.pixels.shape}"
        )
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored {bits_stored} does not fit 16 allocated bits")
    if pixels.size and int(pixels.max()) >= 2**bits_stored:
        raise ValueError(
            f"synthetic pixels reach {int(pixels.max())}, more than {bits_stored} bits hold"
        )


def _copy(
    target: Dataset, source: Dataset, keywords: Sequence[str], required: Sequence[str] = ()
) -> None:
    # Copies the element with its VR, so names and dates survive unchanged; a deep copy, as
    # sequence items shared between two datasets would be changed through both.
    # ``required`` are Type 2: present even when the source lacks them, then empty.
    for keyword in keywords:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
        elif keyword in required:
            setattr(target, keyword, None)


def _series_number(source_number: object, kind: DerivedKind) -> int | None:
    if source_number is None or source_number == "":
        return None
    offset = SERIES_NUMBER_OFFSET
    if kind is DerivedKind.UNCERTAINTY:
        offset = UNCERTAINTY_SERIES_NUMBER_OFFSET
    number = int(source_number) + offset
    return number if -_IS_MAX <= number <= _IS_MAX else None


def instance_numbers(headers: Sequence[Dataset]) -> list[int]:
    """The InstanceNumber of each slice of a series derived from one with ``headers``."""
    source = [header.get("InstanceNumber") for header in headers]
    if any(number is None or number == "" for number in source):
        return list(range(1, len(headers) + 1))
    # Ties keep the volume's order, so the numbers are always 1..S without repeats.
    order = sorted(range(len(headers)), key=lambda index: (int(source[index]), index))
    numbers = [0] * len(headers)
    for rank, index in enumerate(order, start=1):
        numbers[index] = rank
    return numbers


def _describe(header: Dataset) -> str:
    if header.get("SeriesDescription"):
        return str(header.SeriesDescription)
    number = header.get("SeriesNumber")
    return "unnamed series" if number is None or number == "" else f"series {number}"


def _was_lossy_compressed(header: Dataset) -> bool:
    syntax = getattr(header, "file_meta", Dataset()).get("TransferSyntaxUID")
    return header.get("LossyImageCompression") == "01" or syntax in _LOSSY_SYNTAXES


def _software_versions(series: _SyntheticSeries) -> list[str]:
    model = series.model
    values = [f"dicomnode {series.software_version}", f"{model.name} {model.version}"]
    return [_truncate(value, _LO_MAX) for value in [*values, model.checksum]]


def _synthesizing_equipment(series: _SyntheticSeries) -> Dataset:
    model = series.model
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(codes.DCM.SynthesizingEquipment)])
    item.Manufacturer = "dicomnode"
    item.ManufacturerModelName = _truncate(model.name, _LO_MAX)
    item.SoftwareVersions = _software_versions(series)
    item.ContributionDateTime = series.created.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = _truncate(
        f"Synthesized the {series.contrast}-weighted image with model {model.name} "
        f"version {model.version}, checksum {model.checksum}",
        _ST_MAX,
    )
    return item


def _acquisition_equipment(header: Dataset) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code(codes.DCM.AcquisitionEquipment)])
    _copy(
        item,
        header,
        (
            "Manufacturer",
            "InstitutionName",
            "InstitutionalDepartmentName",
            "StationName",
            "ManufacturerModelName",
            "DeviceSerialNumber",
            "SoftwareVersions",
        ),
    )
    item.ContributionDescription = "Acquired the source image"
    return item


def _source_image(header: Dataset, frame: int | None) -> Dataset:
    item = _referenced_instance(header)
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code(codes.DCM.SourceImageForImageProcessingOperation)]
    )
    return item


def _referenced_instance(header: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def _code(code: Code) -> Dataset:
    """A Code Sequence Macro item of ``code`` (from pydicom's DICOM code dictionary)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
