"""Reading series into volumes: ordering in space, pixel values, and every refusal."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipeline.dicom.volume import SeriesError, load_series
from tests.support.dicomgen import enhanced_mr

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SERIES_UID = generate_uid()
FRAME_UID = generate_uid()


def make_slice(
    z: float,
    *,
    orientation: list[float] = AXIAL,
    stored: np.ndarray | None = None,
    signed: bool = False,
    bits_stored: int = 16,
) -> Dataset:
    """A minimal single-frame MR slice whose position lies at ``z`` along the IOP normal."""
    rows, columns = (3, 4) if stored is None else stored.shape
    if stored is None:
        stored = np.full(
            (rows, columns), int(z * 10) + 100, dtype=np.int16 if signed else np.uint16
        )
    normal = np.cross(orientation[:3], orientation[3:])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.Modality = "MR"
    ds.ImagePositionPatient = [
        f"{value:.6f}" for value in np.array([-10.0, -20.0, 5.0]) + z * normal
    ]
    ds.ImageOrientationPatient = [f"{value:.6f}" for value in orientation]
    ds.PixelSpacing = [0.5, 0.75]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()
    return ds


def write(datasets: list[Dataset], folder: Path) -> list[Path]:
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"slice{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_slices_are_ordered_by_position_not_by_instance_number_or_file_order(tmp_path):
    heights = [0.0, 2.0, 4.0, 6.0, 8.0]
    datasets = [make_slice(z) for z in heights]
    for ds, number in zip(datasets, [3, 1, 5, 2, 4], strict=True):
        ds.InstanceNumber = number
    paths = write(datasets, tmp_path)
    random.Random(7).shuffle(paths)

    volume = load_series(paths)

    assert volume.positions[:, 2].tolist() == pytest.approx([5.0, 7.0, 9.0, 11.0, 13.0])
    assert volume.pixels[:, 0, 0].tolist() == [100, 120, 140, 160, 180]
    assert [header.SOPInstanceUID for header in volume.headers] == [
        ds.SOPInstanceUID for ds in datasets
    ]
    assert all("PixelData" not in header for header in volume.headers)
    assert volume.slice_spacing == pytest.approx(2.0)
    assert volume.uniform_spacing


def test_slices_ascend_along_the_normal_even_when_it_points_down(tmp_path):
    # Column direction posterior-to-anterior makes row x column point to the feet (-z).
    flipped = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    paths = write([make_slice(z, orientation=flipped) for z in (0.0, 1.0, 2.0)], tmp_path)

    volume = load_series(paths)

    assert volume.slice_normal.tolist() == pytest.approx([0.0, 0.0, -1.0])
    assert np.all(np.diff(volume.slice_offsets) > 0)
    # Moving along -z: the highest slice in the patient comes first.
    assert volume.positions[:, 2].tolist() == pytest.approx([5.0, 4.0, 3.0])
    assert volume.pixels[:, 0, 0].tolist() == [100, 110, 120]
    assert volume.affine()[:3, 0].tolist() == pytest.approx([0.0, 0.0, -1.0])


def test_affine_maps_indices_to_patient_coordinates(tmp_path):
    paths = write([make_slice(z) for z in (0.0, 2.5, 5.0)], tmp_path)
    volume = load_series(paths)

    # Slice 2, row 1, column 3: 3 columns along x at 0.75 mm, 1 row along y at 0.5 mm.
    point = volume.affine() @ np.array([2, 1, 3, 1])

    assert point[:3].tolist() == pytest.approx([-10.0 + 3 * 0.75, -20.0 + 1 * 0.5, 10.0])


def test_native_oblique_series_is_ordered_and_placed_whatever_the_file_order(mr_brain):
    paths = sorted((mr_brain / "tcga-fg-6692-native" / "03_t1").glob("*.dcm"))
    shuffled = list(paths)
    random.Random(3).shuffle(shuffled)

    volume = load_series(shuffled)
    reference = load_series(paths)

    assert volume.pixels.shape == (26, 224, 256)
    assert np.array_equal(volume.pixels, reference.pixels)
    assert np.linalg.norm(volume.slice_normal) == pytest.approx(1.0)
    assert abs(volume.slice_normal[2]) < 0.999  # oblique: not a pure axial normal
    assert volume.slice_gaps == pytest.approx(np.full(25, 5.5), abs=1e-3)
    for index in (0, 13, 25):
        header = volume.headers[index]
        row, column = 7, 11
        expected = (
            np.array(header.ImagePositionPatient, dtype=float)
            + column
            * float(header.PixelSpacing[1])
            * np.array(header.ImageOrientationPatient[:3], dtype=float)
            + row
            * float(header.PixelSpacing[0])
            * np.array(header.ImageOrientationPatient[3:], dtype=float)
        )
        assert (volume.affine() @ [index, row, column, 1])[:3] == pytest.approx(expected, abs=1e-3)


def test_rescale_slope_and_intercept_apply_per_slice_to_signed_pixels(tmp_path):
    stored = np.array([[-2048, -1, 0], [1, 1000, 2047]], dtype=np.int16)
    first = make_slice(0.0, stored=stored, signed=True, bits_stored=12)
    first.RescaleSlope, first.RescaleIntercept = 2.5, -100
    second = make_slice(1.0, stored=stored, signed=True, bits_stored=12)
    second.RescaleSlope, second.RescaleIntercept = 0.5, 10

    volume = load_series(write([first, second], tmp_path))

    assert volume.pixels.dtype == np.float32
    assert np.array_equal(volume.pixels[0], stored * 2.5 - 100)
    assert np.array_equal(volume.pixels[1], stored * 0.5 + 10)


def test_unsigned_pixels_above_the_signed_range_keep_their_value(tmp_path):
    stored = np.array([[0, 32768, 65535]], dtype=np.uint16)
    slices = [make_slice(z, stored=stored) for z in (0.0, 1.0)]
    slices[0].RescaleIntercept = -1024

    volume = load_series(write(slices, tmp_path))

    assert volume.pixels[0, 0].tolist() == [-1024, 31744, 64511]
    assert volume.pixels[1, 0].tolist() == [0, 32768, 65535]


def test_non_uniform_gaps_are_allowed_and_recorded(tmp_path):
    volume = load_series(write([make_slice(z) for z in (0.0, 1.0, 2.0, 4.0)], tmp_path))

    assert volume.slice_gaps.tolist() == pytest.approx([1.0, 1.0, 2.0])
    assert not volume.uniform_spacing


def test_volume_arrays_cannot_be_changed(tmp_path):
    volume = load_series(write([make_slice(z) for z in (0.0, 1.0)], tmp_path))

    with pytest.raises(ValueError):
        volume.pixels[0, 0, 0] = 1


def _tilt(ds: Dataset) -> None:
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9848, 0.1736]  # 10 degrees about x


def _resize(ds: Dataset) -> None:
    ds.Rows, ds.Columns = 2, 6


def _respace(ds: Dataset) -> None:
    ds.PixelSpacing = [1.0, 1.0]


def _move_onto_first(ds: Dataset) -> None:
    ds.ImagePositionPatient = [-10, -20, 5]


def _truncate_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[:6]


def _other_series(ds: Dataset) -> None:
    ds.SeriesInstanceUID = generate_uid()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_tilt, "slices are not parallel"),
        (_resize, "slices have different sizes: 3x4 and 2x6"),
        (_respace, "slices have different pixel spacings"),
        (_move_onto_first, "are at the same position"),
        (lambda ds: delattr(ds, "ImagePositionPatient"), "has no ImagePositionPatient"),
        (lambda ds: delattr(ds, "ImageOrientationPatient"), "has no ImageOrientationPatient"),
        (lambda ds: delattr(ds, "PixelSpacing"), "has no PixelSpacing"),
        (lambda ds: delattr(ds, "PixelData"), "has no pixel data"),
        (_truncate_pixels, "cannot be decoded"),
        (
            lambda ds: setattr(ds, "NumberOfFrames", 2),
            "2 frames but no per-frame functional groups; its frames cannot be placed in space",
        ),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"), "only MONOCHROME2"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "only MONOCHROME2"),
        (_other_series, "files belong to different series"),
        (lambda ds: setattr(ds, "RescaleSlope", 0), "RescaleSlope 0"),
    ],
)
def test_inconsistent_series_are_refused_with_a_reason(
    tmp_path, spoil: Callable[[Dataset], None], reason: str
):
    datasets = [make_slice(z) for z in (0.0, 1.0, 2.0)]
    spoil(datasets[1])

    with pytest.raises(SeriesError) as raised:
        load_series(write(datasets, tmp_path))

    assert reason in str(raised.value)


def test_single_slice_is_refused(tmp_path):
    with pytest.raises(SeriesError, match="single slice; synthesis needs at least 2"):
        load_series(write([make_slice(0.0)], tmp_path))
    with pytest.raises(SeriesError, match="no slices"):
        load_series([])


def test_an_enhanced_mr_file_gives_the_volume_of_its_classic_slices(tmp_path):
    classic = [make_slice(z) for z in (0.0, 2.0, 4.0, 6.0)]
    for index, ds in enumerate(classic):  # Philips varies the rescale from slice to slice
        ds.RescaleSlope, ds.RescaleIntercept = 1.0 + index, -float(index)
    enhanced = enhanced_mr(classic, frame_order=[2, 0, 3, 1])
    (tmp_path / "classic").mkdir()
    (tmp_path / "enhanced").mkdir()

    expected = load_series(write(classic, tmp_path / "classic"))
    volume = load_series(write([enhanced], tmp_path / "enhanced"))

    np.testing.assert_array_equal(volume.pixels, expected.pixels)
    np.testing.assert_allclose(volume.positions, expected.positions)
    np.testing.assert_allclose(volume.orientation, expected.orientation)
    np.testing.assert_allclose(volume.pixel_spacing, expected.pixel_spacing)
    assert volume.frames == (2, 4, 1, 3)  # the frames that hold slices 0, 1, 2, 3
    assert expected.frames == (None, None, None, None)
    assert {header.SOPInstanceUID for header in volume.headers} == {enhanced.SOPInstanceUID}
    assert [float(h.RescaleSlope) for h in volume.headers] == [1.0, 2.0, 3.0, 4.0]


def test_enhanced_mr_files_of_one_frame_each_make_one_volume(tmp_path):
    # Some scanners send an Enhanced MR series as one single-frame instance per slice.
    classic = [make_slice(z) for z in (0.0, 1.0, 2.0)]
    volume = load_series(write([enhanced_mr([ds]) for ds in classic], tmp_path))
    assert volume.frames == (1, 1, 1)
    assert volume.pixels[:, 0, 0].tolist() == [100, 110, 120]


def _drop_frame_position(ds: Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence


def _drop_a_frame_item(ds: Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[2]


def _second_echo_at_the_first_position(ds: Dataset) -> None:
    first = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[
        0
    ].ImagePositionPatient = first.ImagePositionPatient


def _short_pixel_data(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_drop_frame_position, "instance frames.dcm frame 2 has no ImagePositionPatient"),
        (_drop_a_frame_item, "instance frames.dcm has 3 frames but 2 per-frame functional group"),
        (_second_echo_at_the_first_position, "frames.dcm frame 1 and frames.dcm frame 2 are at"),
        (_short_pixel_data, "pixel data of frames.dcm cannot be decoded"),
    ],
)
def test_inconsistent_enhanced_mr_is_refused_naming_file_and_frame(tmp_path, spoil, reason):
    enhanced = enhanced_mr([make_slice(z) for z in (0.0, 1.0, 2.0)])
    spoil(enhanced)
    path = tmp_path / "frames.dcm"
    enhanced.save_as(path, enforce_file_format=True)

    with pytest.raises(SeriesError) as raised:
        load_series([path])

    assert reason in str(raised.value)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")  # pydicom's, on reading "many"
def test_enhanced_mr_with_an_unreadable_frame_count_is_refused_by_name(tmp_path):
    path = tmp_path / "frames.dcm"
    enhanced_mr([make_slice(z) for z in (0.0, 1.0)]).save_as(path, enforce_file_format=True)
    # (0028,0008) IS "2 " becomes "many": pydicom will not write such a value itself.
    element = b"\x28\x00\x08\x00IS\x02\x002 "
    assert path.read_bytes().count(element) == 1
    path.write_bytes(path.read_bytes().replace(element, b"\x28\x00\x08\x00IS\x04\x00many"))

    with pytest.raises(SeriesError, match=r"instance frames\.dcm has an unreadable NumberOfFrames"):
        load_series([path])


def test_unreadable_file_is_named(tmp_path):
    paths = write([make_slice(z) for z in (0.0, 1.0)], tmp_path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"this is not DICOM")

    with pytest.raises(SeriesError, match=r"cannot read broken\.dcm as DICOM"):
        load_series([*paths, broken])


def test_blank_series_is_refused(tmp_path):
    blank = np.zeros((3, 4), dtype=np.uint16)
    with pytest.raises(SeriesError, match="blank"):
        load_series(write([make_slice(z, stored=blank) for z in (0.0, 1.0)], tmp_path))


def test_orientation_that_is_not_two_perpendicular_unit_vectors_is_refused(tmp_path):
    skewed = [1.0, 0.0, 0.0, 0.6, 0.8, 0.0]
    with pytest.raises(SeriesError, match="not two perpendicular unit vectors"):
        load_series(write([make_slice(z, orientation=skewed) for z in (0.0, 1.0)], tmp_path))
