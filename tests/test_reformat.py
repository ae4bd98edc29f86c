"""Axial views: 3D sagittal and coronal series go to the models as axial slices and come back
onto their own grid; 2D ones are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.dicom.contrast import Direction
from pipeline.dicom.reformat import (
    at_pixel_size,
    axial_view,
    axial_volume,
    resize_slices,
    working_shape,
)
from pipeline.dicom.volume import SeriesError, Volume, load_series
from pipeline.model.card import load_model
from pipeline.model.inference import Synthesizer
from pipeline.model.preprocess import head_mask
from pipeline.model.registry import ModelRegistry
from pipeline.settings import OutputSettings
from pipeline.synthesis import synthesize_series
from tests.support.dicomgen import as_sagittal_files

UNLABELLED = OutputSettings(burn_in_label=False)  # a label's place differs with the plane

SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "models"


def volume(row, column, *, spacing=(1.0, 1.0), step=1.0, shape=(6, 7, 8), value=None) -> Volume:
    """A volume of the given orientation whose pixels are ``value`` of each voxel's place."""
    row, column = np.asarray(row, float), np.asarray(column, float)
    normal = np.cross(row, column)
    origin = np.array([-30.0, 12.0, 40.0])
    positions = np.array([origin + k * step * normal for k in range(shape[0])])
    grid = Volume(
        pixels=np.zeros(shape, np.float32),
        headers=[],
        positions=positions,
        orientation=np.concatenate([row, column]),
        pixel_spacing=np.asarray(spacing, float),
        slice_normal=normal,
    )
    if value is None:
        return grid
    index = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), axis=-1)
    places = index @ grid.affine()[:3, :3].T + grid.affine()[:3, 3]
    return Volume(**{**grid.__dict__, "pixels": value(places).astype(np.float32)})


# (row direction, column direction) of sagittal and coronal series as scanners write them,
# and one turned 20 degrees about the patient's left-right axis.
_TURN = Rotation.from_euler("x", 20, degrees=True).as_matrix()
PLANES = {
    "sagittal": ([0, 1, 0], [0, 0, -1]),
    "sagittal, rows head to feet": ([0, 0, 1], [0, 1, 0]),
    "coronal": ([1, 0, 0], [0, 0, -1]),
    "coronal, mirrored": ([-1, 0, 0], [0, 0, 1]),
    "oblique sagittal": (_TURN @ [0, 1, 0], _TURN @ [0, 0, -1]),
}


@pytest.mark.parametrize("plane", PLANES)
def test_a_3d_series_is_seen_as_axial_slices_and_comes_back_exactly(plane):
    row, column = PLANES[plane]
    # Each view axis must run the way an axial image's does: slices up (+z), rows to the
    # back (+y), columns to the patient's left (+x).
    for axis, patient_axis in ((0, 2), (1, 1), (2, 0)):
        source = volume(row, column, value=lambda places, a=patient_axis: places[..., a])
        view = axial_view(source)
        assert view.reformatted and view.plane == plane.split(",")[0].split()[-1]
        assert np.all(np.diff(view.pixels, axis=axis) > 0), (plane, axis)
        np.testing.assert_array_equal(view.to_source(view.pixels), source.pixels)
        # As a volume for training, the view keeps every voxel where it was in the patient.
        placed = axial_volume(source)
        index = np.stack(np.meshgrid(*map(np.arange, placed.pixels.shape), indexing="ij"), -1)
        places = index @ placed.affine()[:3, :3].T + placed.affine()[:3, 3]
        np.testing.assert_allclose(placed.pixels, places[..., patient_axis], atol=1e-4)
        assert placed.uniform_spacing and placed.slice_normal @ [0, 0, 1] > 0.9


def test_an_axial_series_goes_in_as_it_is_even_tilted():
    tilted = Rotation.from_euler("x", 17, degrees=True).as_matrix()
    source = volume(tilted @ [1, 0, 0], tilted @ [0, 1, 0], value=lambda p: p[..., 0])
    view = axial_view(source)
    assert not view.reformatted and view.plane == "axial"
    assert view.pixels is source.pixels


def test_a_2d_sagittal_series_is_refused_with_its_spacings():
    thick = volume([0, 1, 0], [0, 0, -1], spacing=(0.9, 0.9), step=5.0)
    with pytest.raises(SeriesError) as raised:
        axial_view(thick)
    message = str(raised.value)
    assert message.startswith("the slices are sagittal (90 degrees from axial)")
    assert "5 mm apart against 0.9 mm pixels" in message


def test_a_3d_series_with_uneven_slices_is_refused():
    source = volume([1, 0, 0], [0, 0, -1])
    uneven = source.positions.copy()
    uneven[3:] += source.slice_normal * 0.5
    with pytest.raises(SeriesError, match=r"coronal .* its slices are not evenly spaced"):
        axial_view(Volume(**{**source.__dict__, "positions": uneven}))


def test_a_sagittal_export_of_a_3d_t1_gets_the_synthetic_t2_of_its_axial_original(
    mr_brain, tmp_path
):
    # healthy-t1-only is a 0.88 mm 3D T1 stored as axial slices; stored again as sagittal
    # slices (rows to the back, columns head to feet), as most scanners send a 3D T1.
    axial_files = sorted((mr_brain / "healthy-t1-only" / "03_t1").glob("*.dcm"))
    axial = load_series(axial_files)
    sagittal_files = as_sagittal_files(axial, tmp_path / "sagittal")
    synthesizer = Synthesizer(load_model(ModelRegistry(SHIPPED_MODELS).active_path("t1-to-t2")))

    from_axial = synthesize_series(axial_files, synthesizer, Direction.T1_TO_T2, "test", UNLABELLED)
    from_sagittal = synthesize_series(
        sagittal_files, synthesizer, Direction.T1_TO_T2, "test", UNLABELLED
    )

    assert len(from_sagittal.datasets) == axial.pixels.shape[2]  # one per sagittal slice
    # Back to the axial grid by each synthetic image's own geometry: the same pixels.
    x_spacing = float(axial.pixel_spacing[1])
    expected = np.stack([ds.pixel_array for ds in from_axial.datasets])  # (z, y, x)
    for ds in from_sagittal.datasets:
        assert list(ds.ImageOrientationPatient) == [0, 1, 0, 0, 0, -1]
        x = round((float(ds.ImagePositionPatient[0]) - axial.positions[0][0]) / x_spacing)
        top = round(
            (float(ds.ImagePositionPatient[2]) - axial.positions[0][2]) / axial.slice_spacing
        )
        assert top == axial.pixels.shape[0] - 1  # the first row is the highest slice
        # The neighbouring slices the model sees are placed from the axial headers' positions
        # in one case and from the grid's spacing in the other: equal to float precision,
        # which can move a rounded stored value by one level of 4096.
        np.testing.assert_allclose(ds.pixel_array[::-1], expected[:, :, x], rtol=0, atol=1)


def test_pixels_near_the_models_size_go_in_as_they_are_and_others_are_resized():
    assert working_shape((224, 256), (0.898, 0.898), 1.0) is None  # the native study
    assert working_shape((256, 188), (0.88, 0.88), 1.0) is None  # healthy-t1-only
    assert working_shape((512, 512), (0.45, 0.45), 1.0) == (231, 231)
    assert working_shape((128, 160), (1.8, 1.5), 1.0) == (230, 239)


def test_resizing_keeps_the_slice_in_place_and_the_geometry_true():
    source = volume([1, 0, 0], [0, 1, 0], spacing=(0.5, 0.4), shape=(3, 41, 51))
    source = Volume(**{**source.__dict__, "pixels": np.ones((3, 41, 51), np.float32)})
    resized = at_pixel_size(source, 1.0)
    assert resized.pixels.shape == (3, 21, 21)
    # The first and last pixel centres stay where they were in the patient.
    for corner, old in (((0, 0, 0), (0, 0, 0)), ((2, 20, 20), (2, 40, 50))):
        np.testing.assert_allclose(
            resized.affine() @ [*corner, 1], source.affine() @ [*old, 1], atol=1e-9
        )
    np.testing.assert_allclose(resized.pixels, 1.0, atol=1e-6)  # a flat image stays flat
    near = volume([1, 0, 0], [0, 1, 0], spacing=(0.9, 0.9))
    assert at_pixel_size(near, 1.0) is near


def test_a_slice_with_half_size_pixels_gets_the_synthetic_it_gets_at_the_models_size(mr_brain):
    # brats-met-00110 is a 1 mm series; upsampled, it is the same brain as a 512 matrix at
    # 0.5 mm would show it. Unresampled, the network sees the brain at twice its size.
    t1 = load_series(sorted((mr_brain / "brats-met-00110" / "03_t1").glob("*.dcm")))
    slices = t1.pixels[60:90:6]
    offsets = t1.slice_offsets[60:90:6]
    synthesizer = Synthesizer(load_model(ModelRegistry(SHIPPED_MODELS).active_path("t1-to-t2")))
    at_model_size = synthesizer.synthesize(slices, (1.0, 1.0), offsets)
    fine = resize_slices(slices, (479, 479))  # 240 pixels of 1 mm as 0.5 mm ones
    head = head_mask(slices)

    def agreement(fine_output: np.ndarray) -> float:
        back = resize_slices(fine_output, slices.shape[1:])
        return float(np.corrcoef(back[head], at_model_size[head])[0, 1])

    resampled = agreement(synthesizer.synthesize(fine, (0.5, 0.5), offsets))
    as_it_is = agreement(synthesizer.synthesize(fine, (1.0, 1.0), offsets))  # as if 1 mm
    assert resampled > 0.95 > 0.85 > as_it_is
