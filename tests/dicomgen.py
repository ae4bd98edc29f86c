"""Small MR instances made in code, for tests that need odd or broken input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


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
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
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
