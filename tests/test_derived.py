"""The synthetic series: deterministic UIDs, marking, copied context, and dciodvfy's verdict."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.dicom.derived import (
    ModelIdentity,
    build_synthetic_series,
    derived_instance_uid,
    derived_series_uid,
    encode,
    write_series,
)
from pipeline.dicom.values import InvalidUID, check_uid
from pipeline.dicom.volume import Volume, load_series
from tests.support.dicomgen import enhanced_mr
from tests.support.validators import assert_dciodvfy_finds_no_error

MODEL = ModelIdentity(name="unet-t1-to-t2", version="1.2.0", checksum="9f" * 32)
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
    "SpecificCharacterSet",
)
GEOMETRY = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)


@pytest.fixture(scope="module")
def native_t1(mr_brain: Path) -> Volume:
    return load_series(sorted((mr_brain / "tcga-fg-6692-native" / "03_t1").glob("*.dcm")))


def fake_pixels(volume: Volume) -> np.ndarray:
    # Not the source's values, so that a copy of the source pixels would be caught.
    return (np.arange(volume.pixels.size) % 4096).astype(np.uint16).reshape(volume.pixels.shape)


def build(volume: Volume, model: ModelIdentity = MODEL) -> list[pydicom.Dataset]:
    return build_synthetic_series(
        volume,
        fake_pixels(volume),
        bits_stored=12,
        window_center=2048,
        window_width=4096,
        target_contrast="T2",
        model=model,
        software_version="0.1.0",
    )


def with_headers(volume: Volume, change) -> Volume:
    headers = [copy.deepcopy(header) for header in volume.headers]
    for header in headers:
        change(header)
    return dataclasses.replace(volume, headers=headers)


def test_uids_are_deterministic_valid_and_change_with_the_model():
    source = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    newer = dataclasses.replace(MODEL, version="1.3.0")

    series = derived_series_uid(source, MODEL)
    instance = derived_instance_uid(source, MODEL)

    assert series == derived_series_uid(source, MODEL)
    assert instance == derived_instance_uid(source, MODEL)
    assert series != instance
    assert derived_series_uid(source, newer) != series
    assert derived_instance_uid(source, newer) != instance
    assert derived_series_uid(source + "1", MODEL) != series
    # Fields are kept apart: moving a character from the name to the version changes the UID.
    shifted = ModelIdentity(
        name=MODEL.name[:-1], version=MODEL.name[-1] + MODEL.version, checksum=MODEL.checksum
    )
    assert derived_series_uid(source, shifted) != series
    for uid in (series, instance):
        assert uid.startswith("2.25.")
        assert check_uid(uid, "derived UID") == uid
    # Pinned: another value would make every re-run a second series in the PACS.
    assert series == "2.25.161116029478537518269151725368762636255"
    assert instance == "2.25.121200424293559436104835231351198915559"
    # The frames of one multi-frame source instance each get their own.
    frames = {derived_instance_uid(source, MODEL, frame) for frame in (1, 2)}
    assert len(frames) == 2 and instance not in frames


def test_a_rerun_gives_the_same_uids_and_a_new_model_new_ones(native_t1):
    first, again = build(native_t1), build(native_t1)
    other = build(native_t1, dataclasses.replace(MODEL, checksum="ab" * 32))

    assert [ds.SOPInstanceUID for ds in first] == [ds.SOPInstanceUID for ds in again]
    assert len({ds.SOPInstanceUID for ds in first}) == len(first) == 26
    assert len({ds.SeriesInstanceUID for ds in first}) == 1
    assert first[0].SeriesInstanceUID == again[0].SeriesInstanceUID
    assert other[0].SeriesInstanceUID != first[0].SeriesInstanceUID
    assert not {ds.SOPInstanceUID for ds in other} & {ds.SOPInstanceUID for ds in first}


def test_output_is_marked_synthetic_everywhere_a_reader_looks(native_t1):
    for ds in build(native_t1):
        assert list(ds.ImageType[:3]) == ["DERIVED", "SECONDARY", "OTHER"]
        assert ds.SeriesDescription == "SYNTHETIC T2 from AX T1 SE"
        for part in (MODEL.name, MODEL.version, MODEL.checksum, "not acquired"):
            assert part in ds.DerivationDescription
        assert ds.ImageComments.startswith("SYNTHETIC T2")
        assert ds.Manufacturer == "dicomnode"
        assert list(ds.SoftwareVersions) == [
            "dicomnode 0.1.0",
            "unet-t1-to-t2 1.2.0",
            MODEL.checksum,
        ]
        synthesizer, scanner = ds.ContributingEquipmentSequence
        assert synthesizer.PurposeOfReferenceCodeSequence[0].CodeValue == "109100"
        assert synthesizer.Manufacturer == "dicomnode"
        assert MODEL.checksum in synthesizer.ContributionDescription
        assert scanner.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
        assert scanner.Manufacturer == "SIEMENS"
        assert ds.BurnedInAnnotation == "NO"
        assert ds.LossyImageCompression == "00"
        assert ds.WindowCenterWidthExplanation == "SYNTHETIC T2"


def test_no_acquisition_parameters_are_claimed(native_t1):
    assert native_t1.headers[0].RepetitionTime == 500  # the source has them
    for ds in build(native_t1):
        assert ds.ScanningSequence == "RM"
        assert ds.SequenceVariant == "NONE"
        for keyword in (
            "RepetitionTime",
            "EchoTime",
            "EchoTrainLength",
            "ScanOptions",
            "MRAcquisitionType",
        ):
            assert ds[keyword].is_empty, keyword
        for keyword in (
            "FlipAngle",
            "InversionTime",
            "ProtocolName",
            "AcquisitionDate",
            "MagneticFieldStrength",
        ):
            assert keyword not in ds, keyword


def test_same_patient_and_study_new_series_and_geometry_slice_by_slice(native_t1):
    for ds, source in zip(build(native_t1), native_t1.headers, strict=True):
        for keyword in PATIENT_AND_STUDY + GEOMETRY:
            assert ds[keyword].value == source[keyword].value, keyword
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SeriesNumber == 1003
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert ds.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        referenced = ds.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
        assert (
            referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
            == source.SOPInstanceUID
        )


def test_instance_numbers_follow_the_source_numbering(native_t1):
    reversed_numbers = with_headers(
        native_t1, lambda header: setattr(header, "InstanceNumber", 100 - header.InstanceNumber)
    )

    for volume in (native_t1, reversed_numbers):
        out = [ds.InstanceNumber for ds in build(volume)]
        source = [header.InstanceNumber for header in volume.headers]
        assert sorted(out) == list(range(1, 27))
        assert np.array_equal(np.argsort(out), np.argsort(source))


def test_missing_optional_source_attributes_still_give_valid_output(native_t1, tmp_path):
    def strip_and_compress(header):
        for keyword in ("SeriesNumber", "SeriesDescription", "Manufacturer", "PatientPosition"):
            delattr(header, keyword)
        header.LossyImageCompression = "01"

    datasets = build(with_headers(native_t1, strip_and_compress))

    ds = datasets[0]
    assert ds["SeriesNumber"].is_empty
    assert ds.SeriesDescription == "SYNTHETIC T2 from unnamed series"
    assert ds.LossyImageCompression == "01"
    assert len(ds.ContributingEquipmentSequence) == 1  # no unnamed scanner listed
    assert_dciodvfy_finds_no_error(write_series(datasets[:2], tmp_path))


def test_source_without_frame_of_reference_gets_one_shared_frame(native_t1):
    without = with_headers(native_t1, lambda header: delattr(header, "FrameOfReferenceUID"))

    frames = {ds.FrameOfReferenceUID for ds in build(without)}
    newer = {
        ds.FrameOfReferenceUID for ds in build(without, dataclasses.replace(MODEL, version="2"))
    }

    assert len(frames) == 1
    assert frames == newer
    assert check_uid(frames.pop(), "frame of reference")


def test_long_description_is_cut_to_the_lo_limit_and_names_survive_utf8(native_t1):
    def rename(header):
        header.SpecificCharacterSet = "ISO_IR 192"
        header.PatientName = "Müller^Jörg=山田^太郎"
        header.SeriesDescription = "AX T1 SE " + "X" * 55

    ds = build(with_headers(native_t1, rename))[0]
    read_back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(ds)))

    assert read_back.PatientName == "Müller^Jörg=山田^太郎"
    assert len(read_back.SeriesDescription) == 64
    assert read_back.SeriesDescription.startswith("SYNTHETIC T2 from AX T1 SE XXX")


def test_bad_pixels_are_refused(native_t1):
    pixels = fake_pixels(native_t1)
    arguments = dict(
        window_center=1, window_width=2, target_contrast="T2", model=MODEL, software_version="0"
    )
    with pytest.raises(ValueError, match="uint16"):
        build_synthetic_series(native_t1, pixels.astype(np.int16), bits_stored=12, **arguments)
    with pytest.raises(ValueError, match="shape"):
        build_synthetic_series(native_t1, pixels[1:], bits_stored=12, **arguments)
    with pytest.raises(ValueError, match="10 bits"):
        build_synthetic_series(native_t1, pixels, bits_stored=10, **arguments)
    with pytest.raises(ValueError, match="target contrast"):
        build_synthetic_series(
            native_t1, pixels, bits_stored=12, **{**arguments, "target_contrast": "FLAIR"}
        )


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_dataset_whose_uid_could_escape_the_folder_is_not_written(native_t1, tmp_path):
    ds = build(native_t1)[0]
    ds.SOPInstanceUID = "../../etc/passwd"

    with pytest.raises(InvalidUID):
        write_series([ds], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_enhanced_source_gives_classic_images_that_name_their_frames(
    mr_brain, native_t1, tmp_path
):
    files = sorted((mr_brain / "tcga-fg-6692-native" / "03_t1").glob("*.dcm"))
    enhanced = enhanced_mr([pydicom.dcmread(path) for path in files], list(range(26))[::-1])
    enhanced.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    volume = load_series([tmp_path / "enhanced.dcm"])

    datasets = build(volume)

    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets) == 26
    assert volume.frames == tuple(range(26, 0, -1))  # frame 1 holds the top slice
    for ds, frame in zip(datasets, volume.frames, strict=True):
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        (source,) = ds.SourceImageSequence
        assert source.ReferencedSOPClassUID == pydicom.uid.EnhancedMRImageStorage
        assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert source.ReferencedFrameNumber == frame
    classic = build(native_t1)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        assert [ds[keyword].value for ds in datasets] == [ds[keyword].value for ds in classic]
    assert [ds.SliceThickness for ds in datasets] == [ds.SliceThickness for ds in classic]
    assert_dciodvfy_finds_no_error(write_series(datasets, tmp_path / "out"))


def test_written_files_read_back_and_pass_dciodvfy(native_t1, tmp_path):
    datasets = build(native_t1)
    paths = write_series(datasets, tmp_path)

    assert sorted(paths) == sorted(tmp_path / f"{ds.SOPInstanceUID}.dcm" for ds in datasets)
    assert sorted(tmp_path.iterdir()) == sorted(paths)  # no temporary files left
    pixels = fake_pixels(native_t1)
    for index, path in enumerate(paths):
        data = path.read_bytes()
        assert data[128:132] == b"DICM"
        written = pydicom.dcmread(path)
        assert written.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert written.file_meta.MediaStorageSOPInstanceUID == written.SOPInstanceUID
        assert np.array_equal(written.pixel_array, pixels[index])

    assert_dciodvfy_finds_no_error(paths)
    # dcentvfy checks that patient, study and series attributes agree across the files.
    report = subprocess.run(
        ["dcentvfy", *map(str, paths)], capture_output=True, text=True, check=False
    )
    assert [
        line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")
    ] == []
