"""Small MR instances made in code, for tests that need odd or broken input."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from pipeline.dicom.volume import Volume


def mr_series(
    count: int = 4,
    rows: int = 32,
    columns: int = 32,
    *,
    tr: float = 500,
    te: float = 12,
    description: str = "AX T1 SE",
    announce: bool = True,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Dataset]:
    """A T1-like axial series of ``count`` slices (headers like a scanner's)."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame = generate_uid()
    rng = np.random.default_rng(count * rows + columns)
    datasets = []
    for index in range(count):
        ds = Dataset()
        _new_instance(ds, MRImageStorage)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame
        ds.PatientName = "TEST^SECRET"
        ds.PatientID = "TEST-0001"
        ds.Modality = "MR"
        ds.SeriesDescription = description
        ds.SeriesNumber = 3
        ds.InstanceNumber = index + 1
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "SK"
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = tr
        ds.EchoTime = te
        ds.BodyPartExamined = "BRAIN"
        if announce:
            ds.ImagesInAcquisition = count
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(index * 5)]
        ds.PixelSpacing = [1, 1]
        ds.SliceThickness = 5
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4000, (rows, columns), dtype=np.uint16).tobytes()
        datasets.append(ds)
    return datasets


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# Classic attributes that an Enhanced MR instance keeps per frame or in its functional groups.
_PER_FRAME_IN_ENHANCED = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "RepetitionTime",
    "EchoTime",
    "FlipAngle",
    "EchoTrainLength",
    "InversionTime",
    "ImagesInAcquisition",
    "WindowCenter",
    "WindowWidth",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
)


def enhanced_mr(slices: list[Dataset], frame_order: list[int] | None = None) -> Dataset:
    """One Enhanced MR instance holding ``slices`` (single-frame MR) as its frames.

    As a Siemens XA or Philips scanner writes it: orientation, spacing and the sequence's
    timing shared by all frames, each frame's position and rescale in its own functional
    groups, none of them where a classic image has them. ``frame_order`` lists which slice
    each frame holds (default: the slices' order).
    """
    order = list(range(len(slices))) if frame_order is None else frame_order
    first = slices[0]
    ds = Dataset()
    for element in first:
        if element.keyword not in (*_PER_FRAME_IN_ENHANCED, "PixelData"):
            ds.add(copy.deepcopy(element))
    _new_instance(ds, EnhancedMRImageStorage)
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = len(order)

    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([_item(first, "PixelSpacing", "SliceThickness")])
    shared.PlaneOrientationSequence = Sequence([_item(first, "ImageOrientationPatient")])
    timing = _item(first, "RepetitionTime", "FlipAngle", "EchoTrainLength")
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    echo = Dataset()
    if "EchoTime" in first:
        echo.EffectiveEchoTime = float(first.EchoTime)
    shared.MREchoSequence = Sequence([echo])
    if first.get("InversionTime"):
        modifier = Dataset()
        modifier.InversionRecovery = "YES"
        modifier.InversionTimes = [float(first.InversionTime)]
        shared.MRModifierSequence = Sequence([modifier])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    frames = []
    for index in order:
        groups = Dataset()
        groups.PlanePositionSequence = Sequence([_item(slices[index], "ImagePositionPatient")])
        transform = _item(slices[index], "RescaleSlope", "RescaleIntercept")
        if len(transform):
            transform.RescaleType = "US"
            groups.PixelValueTransformationSequence = Sequence([transform])
        content = Dataset()
        content.InStackPositionNumber = index + 1
        groups.FrameContentSequence = Sequence([content])
        frames.append(groups)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    stored = "<i2" if first.get("PixelRepresentation") == 1 else "<u2"
    ds.PixelData = b"".join(slices[index].pixel_array.astype(stored).tobytes() for index in order)
    return ds


def _item(source: Dataset, *keywords: str) -> Dataset:
    item = Dataset()
    for keyword in keywords:
        if keyword in source:
            item[keyword] = copy.deepcopy(source[keyword])
    return item


def as_sagittal_files(axial: Volume, folder: Path) -> list[Path]:
    """An axial 3D series (read by load_series) written again as sagittal slices, as most
    scanners send a 3D T1: rows run to the back, columns from the head to the feet."""
    folder.mkdir(parents=True)
    affine = axial.affine()
    top = axial.pixels.shape[0] - 1
    stored = axial.pixels.astype(np.uint16)
    assert np.array_equal(stored, axial.pixels), "written without rescale: whole numbers only"
    paths = []
    for x in range(axial.pixels.shape[2]):
        ds = pydicom.dcmread(axial.headers[0].filename)
        _new_instance(ds, ds.SOPClassUID)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.InstanceNumber = x + 1
        if "ImagesInAcquisition" in ds:
            ds.ImagesInAcquisition = axial.pixels.shape[2]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in affine[:3] @ [top, 0, x, 1]]
        ds.PixelSpacing = [f"{axial.slice_spacing:.4f}", f"{axial.pixel_spacing[0]:.4f}"]
        image = stored[::-1, :, x]  # rows from the top slice down, columns front to back
        ds.Rows, ds.Columns = image.shape
        ds.PixelData = np.ascontiguousarray(image).tobytes()
        for keyword in ("SliceLocation", "RescaleSlope", "RescaleIntercept"):
            if keyword in ds:
                delattr(ds, keyword)
        path = folder / f"{x:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _new_instance(ds: Dataset, sop_class: str) -> None:
    """Give ``ds`` a new SOP Instance UID of ``sop_class`` and a file meta to be written."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
