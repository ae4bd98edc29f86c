"""Building and writing the synthetic series: one MR Image instance per source slice.

A multi-frame (Enhanced MR) source gives one classic MR Image per frame, each naming its
frame in its Source Image Sequence: every PACS and viewer takes classic images, and the
synthetic slices stay beside the frames they were computed from.

``build_synthetic_series`` is the one place that decides every attribute of the output, so
that what a viewer, a PACS or a validator sees can be read in one function. The choices:

- Marked synthetic wherever readers look: ImageType DERIVED\\SECONDARY\\OTHER\\SYNTHETIC
  (value 3 OTHER is the MR defined term for "none of the listed derivations"; value 4 is
  implementation specific), a SeriesDescription starting with SYNTHETIC,
  DerivationDescription, ImageComments, Manufacturer "dicomnode" with the model as
  ManufacturerModelName, and a Contributing Equipment item coded
  (109100, DCM, "Synthesizing Equipment") carrying the model's name, version and checksum;
  the source's scanner follows as (109101, DCM, "Acquisition Equipment") when it is named.
  Synthetic Data (0008,001C) YES, the attribute the standard added for exactly this, is left
  out for now: the dicom3tools and DCMTK installed here (2022) reject it as an unknown
  standard tag; add it once the validator in CI knows it.
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


def derived_series_uid(source_series_uid: str, model: ModelIdentity) -> str:
    """The synthetic series' UID: the same for the same source series and model."""
    return _derived_uid("series", source_series_uid, model.name, model.version, model.checksum)


def derived_instance_uid(
    source_sop_instance_uid: str, model: ModelIdentity, frame: int | None = None
) -> str:
    """The synthetic instance's UID: the same for the same source instance (and frame, in a
    multi-frame source) and model."""
    names = ["instance", source_sop_instance_uid, model.name, model.version, model.checksum]
    if frame is not None:
        names.append(f"frame {frame}")
    return _derived_uid(*names)


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
) -> list[Dataset]:
    """Build one MR Image instance per slice of ``source``, holding ``pixels`` (uint16, S,H,W).

    ``pixels`` are in the volume's slice order; values must fit in ``bits_stored`` bits.
    Raises ValueError when the pixels or arguments do not fit the source.
    """
    _check_arguments(source, pixels, bits_stored, target_contrast)
    now = datetime.now()
    first = source.headers[0]
    series_uid = derived_series_uid(first.SeriesInstanceUID, model)
    source_description = _describe(first)
    lossy = any(_was_lossy_compressed(header) for header in source.headers)
    numbers = _instance_numbers(source.headers)
    frames = source.frames or (None,) * len(source.headers)
    datasets = []
    for index, (header, frame) in enumerate(zip(source.headers, frames, strict=True)):
        ds = Dataset()

        # SOP Common
        _copy(ds, header, ("SpecificCharacterSet", "TimezoneOffsetFromUTC"))
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = derived_instance_uid(header.SOPInstanceUID, model, frame)
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        ds.ContributingEquipmentSequence = DicomSequence(
            [_synthesizing_equipment(model, software_version, target_contrast, now)]
        )
        # Manufacturer is Type 1 in this sequence: an unnamed scanner cannot be listed.
        if header.get("Manufacturer"):
            ds.ContributingEquipmentSequence.append(_acquisition_equipment(header))

        # Patient, Clinical Trial Subject, General Study, Patient Study
        _copy(ds, header, _PATIENT, _PATIENT_TYPE_2)
        _copy(ds, header, _STUDY, _STUDY_TYPE_2)

        # General Series
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = _series_number(header.get("SeriesNumber"))
        ds.SeriesDate = ds.InstanceCreationDate
        ds.SeriesTime = ds.InstanceCreationTime
        ds.SeriesDescription = _truncate(
            f"SYNTHETIC {target_contrast} from {source_description}", _LO_MAX
        )
        _copy(ds, header, _SERIES)
        _copy(ds, header, ("PatientPosition",), ("PatientPosition",))

        # Frame of Reference
        # A source without one still needs a frame shared by all its derived series.
        ds.FrameOfReferenceUID = header.get("FrameOfReferenceUID") or _derived_uid(
            "frame-of-reference", first.SeriesInstanceUID
        )
        ds.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "")

        # General Equipment: this equipment made the series; the scanner is a contributor.
        ds.Manufacturer = "dicomnode"
        ds.ManufacturerModelName = _truncate(model.name, _LO_MAX)
        ds.SoftwareVersions = _software_versions(model, software_version)

        # General Image and General Reference
        ds.InstanceNumber = numbers[index]
        ds.ContentDate = ds.InstanceCreationDate
        ds.ContentTime = ds.InstanceCreationTime
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER", "SYNTHETIC"]
        ds.DerivationDescription = _truncate(
            f"Synthetic {target_contrast}-weighted image computed from {source_description} by "
            f"model {model.name} version {model.version} (checksum {model.checksum}); "
            "not acquired by a scanner",
            _ST_MAX,
        )
        ds.ImageComments = (
            f"SYNTHETIC {target_contrast}: computed by {model.name} {model.version}, not acquired"
        )
        ds.SourceImageSequence = DicomSequence([_source_image(header, frame)])
        ds.BurnedInAnnotation = "NO"
        # A synthetic image is not itself compressed, but lossy loss in its input carries over.
        ds.LossyImageCompression = "01" if lossy else "00"
        if lossy:
            _copy(ds, header, ("LossyImageCompressionRatio", "LossyImageCompressionMethod"))

        # Image Plane, slice by slice as the source
        _copy(ds, header, _PLANE)
        ds.SliceThickness = header.get("SliceThickness", "")

        # Contrast/Bolus
        _copy(ds, header, _CONTRAST_BOLUS)

        # MR Image: see the module docstring for why these values
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""

        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = (int(size) for size in pixels.shape[1:])
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels[index], dtype="<u2").tobytes()

        # VOI LUT
        ds.WindowCenter = f"{window_center:.6g}"
        ds.WindowWidth = f"{window_width:.6g}"
        ds.WindowCenterWidthExplanation = f"SYNTHETIC {target_contrast}"

        # Common Instance Reference: the source series of the referenced source image
        reference = Dataset()
        reference.SeriesInstanceUID = header.SeriesInstanceUID
        reference.ReferencedInstanceSequence = DicomSequence([_referenced_instance(header)])
        ds.ReferencedSeriesSequence = DicomSequence([reference])

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    return datasets


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


def _series_number(source_number: object) -> int | None:
    if source_number is None or source_number == "":
        return None
    number = int(source_number) + SERIES_NUMBER_OFFSET
    return number if -_IS_MAX <= number <= _IS_MAX else None


def _instance_numbers(headers: Sequence[Dataset]) -> list[int]:
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


def _software_versions(model: ModelIdentity, software_version: str) -> list[str]:
    values = [f"dicomnode {software_version}", f"{model.name} {model.version}", model.checksum]
    return [_truncate(value, _LO_MAX) for value in values]


def _synthesizing_equipment(
    model: ModelIdentity, software_version: str, target_contrast: Contrast, now: datetime
) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("109100", "DCM", "Synthesizing Equipment")]
    )
    item.Manufacturer = "dicomnode"
    item.ManufacturerModelName = _truncate(model.name, _LO_MAX)
    item.SoftwareVersions = _software_versions(model, software_version)
    item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    item.ContributionDescription = _truncate(
        f"Synthesized the {target_contrast}-weighted image with model {model.name} "
        f"version {model.version}, checksum {model.checksum}",
        _ST_MAX,
    )
    return item


def _acquisition_equipment(header: Dataset) -> Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code("109101", "DCM", "Acquisition Equipment")]
    )
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
        [_code("121322", "DCM", "Source image for image processing operation")]
    )
    return item


def _referenced_instance(header: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
