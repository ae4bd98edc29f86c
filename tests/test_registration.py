"""Registration that knows the answer: real T2 anatomy moved by known motions, acquired on
grids of its own, placed back on its own T1; and resampling through DICOM geometry.

Accuracy is judged by the residual transform between the found geometry and the true one:
its rotation angle, and the displacement it gives the centre of the head in the moved
series (the part of the head both series hold).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipeline.dicom.registration import (
    RegistrationSettings,
    Rigid,
    register_rigid,
    resample_onto,
    rigid_matrix,
    sitk_image,
    transformed,
)
from pipeline.dicom.volume import Volume, load_series
from pipeline.model.preprocess import head_mask
from train.pairing import main as pairing_report
from train.pairing import save_overlay
from train.pairs import find_pairs, load_pair


@pytest.fixture(scope="module")
def anatomy(mr_brain: Path) -> tuple[Volume, Volume]:
    """A patient's T1 and T2 at 1 mm, co-registered (one grid)."""
    (pair,) = find_pairs([mr_brain / "tcga-fg-6692"]).pairs
    return load_series(pair.t1.files), load_series(pair.t2.files)


@pytest.fixture(scope="module")
def t1_2mm(anatomy) -> Volume:
    # The T1 in 2 mm voxels (means of 2x2x2 blocks): an eighth of the voxels for the metric
    # to sample, so a registration takes seconds; accuracy stays well inside 1 mm.
    return _shrunk(anatomy[0], 2)


# (rotation vector in degrees, translation in mm) of the head, and the grid it is acquired
# on: (slices, rows, columns), pixel and slice spacing (mm), the grid's own tilt (degrees).
MOTIONS = {
    "15 deg about LR, 20 mm S; 160x192 1.25 mm pixels, 3 mm slices": (
        (15, 0, 0), (0, 0, 20), (50, 160, 192), 1.25, 3.0, (0, 0, 0)),
    "15 deg about AP, 20 mm L; 4 mm slices tilted 5 deg": (
        (0, 15, 0), (20, 0, 0), (36, 200, 200), 1.0, 4.0, (5, 0, 0)),
    "15 deg about SI, 20 mm P; slab of 16 5 mm slices": (
        (0, 0, 15), (0, 20, 0), (16, 256, 224), 0.9, 5.0, (0, 0, 0)),
    "10, -8, 12 deg, (-12, 15, 8) mm; 3.5 mm slices tilted 10 deg": (
        (10, -8, 12), (-12, 15, 8), (40, 224, 256), 0.9, 3.5, (-10, 0, 0)),
    "no motion; 3.5 mm slices": (
        (0, 0, 0), (0, 0, 0), (40, 224, 256), 0.9, 3.5, (0, 0, 0)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MOTIONS))
def test_a_known_motion_is_undone(anatomy, t1_2mm, name) -> None:
    rotation, translation, shape, pixel, thickness, tilt = MOTIONS[name]
    t1, t2 = t1_2mm, anatomy[1]
    head = head_mask(t1.pixels)
    motion = rigid_matrix(np.array(rotation, float), np.array(translation, float), _centre(t1))
    grid = _grid(shape, pixel, thickness, tilt, _centre(t1) + np.array([0.0, 0.0, 10.0]))
    moved = _acquired(t2, motion, grid, thickness)  # the header knows nothing of the motion
    truth = transformed(moved, np.linalg.inv(motion))

    found, rigid = register_rigid(moved, t1, head, head_mask(moved.pixels))

    angle, offset = _residual(found, truth, _centre(truth, head_mask(moved.pixels)))
    assert angle < 1.0 and offset < 1.0, rigid.describe()
    if rotation != (0, 0, 0):
        assert rigid.applied, rigid.describe()
        assert rigid.metric_after > 3 * rigid.metric_before
        assert abs(rigid.angle_degrees - np.linalg.norm(rotation)) < 1.0


def test_a_1mm_volume_is_placed_on_a_5mm_slab(anatomy) -> None:
    # The other way round: the slab (here the T2, moved) is the fixed series, as a 2D T2
    # source of t2-to-t1 would be, and the 1 mm T1 volume the moving one.
    t1, t2 = anatomy
    motion = rigid_matrix(np.array([-12.0, 5.0, 0.0]), np.array([5.0, -8.0, -15.0]), _centre(t1))
    slab = _acquired(t2, motion, _grid((20, 256, 224), 0.9, 5.0, (10, 0, 0), _centre(t1)), 5.0)
    truth = transformed(t1, motion)

    found, rigid = register_rigid(t1, slab, head_mask(slab.pixels), head_mask(t1.pixels))

    angle, offset = _residual(found, truth, _centre(slab, head_mask(slab.pixels)))
    assert rigid.applied and angle < 1.0 and offset < 1.0, rigid.describe()


def test_an_implausible_motion_keeps_the_header_geometry(anatomy, t1_2mm) -> None:
    t1, t2 = t1_2mm, anatomy[1]
    motion = rigid_matrix(np.array([0.0, 0.0, 15.0]), np.array([0.0, 20.0, 0.0]), _centre(t1))
    moved = _acquired(t2, motion, _grid((24, 200, 200), 1.0, 4.0, (0, 0, 0), _centre(t1)), 4.0)
    careful = RegistrationSettings(max_rotation_degrees=10.0)

    found, rigid = register_rigid(moved, t1, head_mask(t1.pixels), head_mask(moved.pixels), careful)

    assert found is moved  # placed by its header, as if never registered
    assert not rigid.applied and 14 < rigid.angle_degrees < 16
    assert re.fullmatch(
        r"header geometry kept \(turn beyond 10 degrees, implausible for one session\): "
        r"registration proposed (19|20)\.\d mm, 1[45]\.\d degrees "
        r"\(mutual information 0\.\d{3} -> 0\.\d{3}\)",
        rigid.describe(),
    ), rigid.describe()
    # The same proposal against the other rules: the shift, and the margin of gain.
    assert RegistrationSettings(max_shift_mm=15).refusal(rigid) == (
        "shift beyond 15 mm, implausible for one session"
    )
    greedy = RegistrationSettings(min_relative_gain=100.0)
    assert greedy.refusal(rigid) == "gain under the margin of 10000%"
    assert RegistrationSettings().refusal(rigid) is None  # the defaults take 15 degrees


def test_series_that_do_not_overlap_keep_their_headers(t1_2mm) -> None:
    far = transformed(t1_2mm, rigid_matrix(np.zeros(3), np.array([0.0, 0.0, 500.0]), np.zeros(3)))
    found, rigid = register_rigid(far, t1_2mm, head_mask(t1_2mm.pixels), head_mask(far.pixels))
    assert found is far and not rigid.applied
    assert rigid.describe() == (
        "header geometry kept (registration failed: All samples map outside moving image buffer)"
    )


def test_the_native_studys_header_error_is_found_in_pairing(mr_brain) -> None:
    # The native T1 and T2 slabs' headers disagree by 16 degrees (ablation.md); the pairs
    # that training, evaluation and the pairing report see are placed by the registration.
    (pair,) = find_pairs([mr_brain / "tcga-fg-6692-native"]).pairs
    paired = load_pair(pair, "t1-to-t2")
    rigid = paired.registration
    assert rigid is not None and rigid.applied
    assert 14 < rigid.angle_degrees < 18 and 14 < rigid.shift_mm < 22
    assert rigid.metric_after > 3 * rigid.metric_before
    assert "registered: moved" in paired.summary()


def test_the_pairing_report_draws_placements_side_by_side(tmp_path) -> None:
    source = np.zeros((6, 40, 40), dtype=np.float32)
    source[:, 10:30, 10:30] = 1.0
    source[:, 15:25, 15:25] = 2.0  # a head with a brighter core
    shifted = np.roll(source, 3, axis=2)
    path = save_overlay(tmp_path / "overlay.png", "a square", source, {"a": source, "b": shifted})
    assert path.read_bytes().startswith(b"\x89PNG")
    for wrong in (["--figure", "x.png"], ["--figure", "x.png", "--pair", "nobody"]):
        with pytest.raises(SystemExit):
            pairing_report([str(tmp_path), *wrong])


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="one value per level"):
        RegistrationSettings(shrink_factors=(4, 2, 1), smoothing_sigmas_mm=(2.0, 1.0))
    with pytest.raises(ValueError, match="sampling_fraction"):
        RegistrationSettings(sampling_fraction=0.0)
    with pytest.raises(ValueError, match="cannot be negative"):
        RegistrationSettings(max_shift_mm=-1.0)


def test_sitk_image_places_voxels_like_the_volume() -> None:
    # Oblique, anisotropic, and a stack whose slices step sideways (a tilted gantry): every
    # voxel must land where Volume.affine() puts it, through SimpleITK's (x, y, z) order.
    row = np.array([np.cos(0.3), np.sin(0.3), 0.0])
    column = np.array([0.0, np.cos(0.5), -np.sin(0.5)])
    volume = _volume((6, 20, 30), (-40.0, 12.0, 7.0), row, column, (0.8, 1.1), 4.0)
    sheared = replace(volume, positions=volume.positions + np.outer(np.arange(6), row) * 0.7)
    image = sitk_image(sheared)
    assert image.GetSize() == (30, 20, 6)
    for index in [(0, 0, 0), (5, 19, 29), (3, 7, 11)]:
        expected = (sheared.affine() @ np.array([*index, 1.0]))[:3]
        placed = image.TransformIndexToPhysicalPoint([int(i) for i in index[::-1]])
        np.testing.assert_allclose(placed, expected, atol=1e-6)


def test_rigid_reports_its_motion_as_a_map_of_patient_space() -> None:
    rigid = Rigid((0.0, 0.0, 90.0), (1.0, 2.0, 3.0), (10.0, 0.0, 0.0), 0.2, 0.5, 1.0)
    # 90 degrees about S: the centre stays put, then moves by the translation.
    np.testing.assert_allclose(rigid.matrix() @ [10, 0, 0, 1], [11, 2, 3, 1], atol=1e-9)
    np.testing.assert_allclose(rigid.matrix() @ [11, 0, 0, 1], [11, 3, 3, 1], atol=1e-9)
    assert rigid.describe() == (
        "registered: moved 3.7 mm, 90.0 degrees from the header geometry "
        "(mutual information 0.200 -> 0.500)"
    )


def _volume(shape, origin, row, column, spacing, step) -> Volume:
    normal = np.cross(row, column)
    positions = np.array([np.asarray(origin) + i * step * normal for i in range(shape[0])])
    pixels = np.zeros(shape, dtype=np.float32)
    return Volume(
        pixels=pixels,
        headers=[],
        positions=positions,
        orientation=np.concatenate([row, column]),
        pixel_spacing=np.asarray(spacing, dtype=float),
        slice_normal=normal,
    )


def test_resampling_follows_geometry_exactly() -> None:
    # A linear field of patient space sampled on an oblique, anisotropic grid: linear
    # interpolation reproduces it exactly wherever the grids overlap, so any error in the
    # affine or the axis order shows.
    angle = np.radians(20)
    row = np.array([1.0, 0.0, 0.0])
    column = np.array([0.0, np.cos(angle), -np.sin(angle)])
    moving = _volume((12, 40, 36), (-20.0, -25.0, -30.0), row, column, (1.5, 1.2), 4.0)

    def field(points: np.ndarray) -> np.ndarray:
        return 3.0 * points[..., 0] - 2.0 * points[..., 1] + 0.5 * points[..., 2] + 100

    s, r, c = np.meshgrid(*(np.arange(n) for n in moving.pixels.shape), indexing="ij")
    index = np.stack([s, r, c, np.ones_like(s)], axis=-1).astype(float)
    moving_values = field((index @ moving.affine().T)[..., :3]).astype(np.float32)
    moving = Volume(**{**moving.__dict__, "pixels": moving_values})

    grid = _volume((10, 30, 30), (-15.0, -20.0, -20.0), np.eye(3)[0], np.eye(3)[1], (1.0, 1.0), 3.0)
    resampled, covered = resample_onto(moving, grid)
    s, r, c = np.meshgrid(*(np.arange(n) for n in grid.pixels.shape), indexing="ij")
    index = np.stack([s, r, c, np.ones_like(s)], axis=-1).astype(float)
    points = index @ grid.affine().T
    expected = field(points[..., :3])
    # Within the moving voxel centres the interpolation is exact; the half-voxel rim around
    # them counts as covered too, and holds the edge voxels' values.
    in_moving = (points @ np.linalg.inv(moving.affine()).T)[..., :3]
    inner = np.all((in_moving >= 0) & (in_moving <= np.array(moving.pixels.shape) - 1), axis=-1)
    assert 0.2 < inner.mean() < covered.mean() < 1.0  # partly outside the slab, as designed
    assert covered[inner].all()
    np.testing.assert_allclose(resampled[inner], expected[inner], rtol=1e-4)
    assert (resampled[~covered] == 0).all()


def _shrunk(volume: Volume, factor: int) -> Volume:
    """``volume`` in voxels ``factor`` times larger, each the mean of the block it covers."""
    s, h, w = (np.array(volume.pixels.shape) // factor) * factor
    blocks = volume.pixels[:s, :h, :w].reshape(s // factor, factor, h // factor, factor, -1, factor)
    affine = volume.affine()
    first = (affine @ np.array([*[(factor - 1) / 2] * 3, 1.0]))[:3]
    steps = np.arange(s // factor)[:, None] * factor * affine[:3, 0]
    return Volume(
        pixels=blocks.mean(axis=(1, 3, 5)).astype(np.float32),
        headers=[],
        positions=first + steps,
        orientation=volume.orientation,
        pixel_spacing=volume.pixel_spacing * factor,
        slice_normal=volume.slice_normal,
    )


def _grid(shape, pixel_mm, thickness_mm, tilt_degrees, centre) -> Volume:
    """An empty axial grid centred on ``centre``, turned by a rotation vector ``tilt``."""
    turn = Rotation.from_rotvec(tilt_degrees, degrees=True).as_matrix()
    row, column = turn[:, 0], turn[:, 1]
    slices, rows, columns = shape
    first = (
        np.asarray(centre)
        - (columns - 1) / 2 * pixel_mm * row
        - (rows - 1) / 2 * pixel_mm * column
        - (slices - 1) / 2 * thickness_mm * np.cross(row, column)
    )
    return _volume(shape, first, row, column, (pixel_mm, pixel_mm), thickness_mm)


def _acquired(volume: Volume, motion: np.ndarray, grid: Volume, thickness_mm: float) -> Volume:
    """What a scanner records on ``grid`` after the head in ``volume`` moved by ``motion``:
    each slice the mean over its thickness (five planes), the header unaware of the motion."""
    head_now = transformed(volume, motion)
    planes = [
        resample_onto(head_now, replace(grid, positions=grid.positions + depth * grid.slice_normal))
        for depth in np.linspace(-0.4, 0.4, 5) * thickness_mm
    ]
    return replace(grid, pixels=np.mean([values for values, _ in planes], axis=0, dtype=np.float32))


def _centre(volume: Volume, head: np.ndarray | None = None) -> np.ndarray:
    """The centre of the head in ``volume`` (LPS mm)."""
    head = head_mask(volume.pixels) if head is None else head
    return (volume.affine() @ np.append(ndimage.center_of_mass(head), 1.0))[:3]


def _residual(found: Volume, truth: Volume, centre: np.ndarray) -> tuple[float, float]:
    """How far ``found`` places the series from ``truth``: the angle (degrees) of the rigid
    map between the two placements, and how far it moves ``centre`` (mm)."""
    error = found.affine() @ np.linalg.inv(truth.affine())
    angle = float(np.linalg.norm(Rotation.from_matrix(error[:3, :3]).as_rotvec(degrees=True)))
    return angle, float(np.linalg.norm((error @ np.append(centre, 1.0))[:3] - centre))
