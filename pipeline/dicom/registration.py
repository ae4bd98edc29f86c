"""Placing one series on another: rigid registration by mutual information, and resampling.

Two series of one study share a frame of reference, so their headers place them in the
same patient space; but the patient may move between series, and a collection's headers
may be wrong (this project's native study leaves its T1 about 17 mm and 16 degrees off its
T2, docs/figures/native-alignment.png). A pair that is off teaches the network a wrong
mapping and makes a quality score compare a synthetic image with misplaced anatomy, so
series acquired on different grids are registered.

The registration is SimpleITK's (ITK's v4 framework): a rigid transform (Euler 3D), Mattes
mutual information inside the fixed series' head, three resolutions, a gradient descent
whose parameter scales come from the physical shift they cause. Mutual information is the
standard measure across contrasts (T1 and T2 have inverted tissue contrast). It starts
from the header geometry and keeps it when the registration gains too little or proposes a
motion that one session does not explain (``RegistrationSettings``); the ``Rigid`` it
returns says which, for the pairing report.

Geometry stays in the project's ``Volume``: the registration's answer is the moving series
with its geometry corrected (its pixels unchanged), which ``resample_onto`` then samples on
any grid, each slice placed by its own ImagePositionPatient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from pipeline.dicom.volume import Volume


@dataclass(frozen=True)
class RegistrationSettings:
    """When a registration's answer replaces the header geometry, and how it is searched.

    The limits say what one session explains: a patient in a head coil turns and shifts by
    a few degrees and millimetres between series. They are set wide enough for this
    project's native study, whose headers disagree by 16 degrees and 18 mm (the same
    correction is found in both directions), and refuse anything larger.
    """

    # The header geometry is kept unless the mutual information of the two series rises by
    # at least this fraction of its value at the header geometry. Measured: undoing a known
    # 15-degree, 20 mm motion gains 500% and more; the native studies' corrections of a few
    # tenths of a millimetre and degree gain 6-12% (mutual information is sharp at 0.5-1 mm
    # pixels); an unmoved pair gains 1.5% at most (docs/registration.md).
    min_relative_gain: float = 0.02
    # Larger motions are refused and the header geometry kept, with the reason in the
    # pairing report: the rotation's angle, and the displacement of the head's centre.
    max_rotation_degrees: float = 20.0
    max_shift_mm: float = 30.0
    # Multi-resolution schedule: each level shrinks both images by its factor (in every
    # axis) after a Gaussian smoothing of its sigma (mm).
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    # Fraction of the sampled series' head voxels the metric reads at each level, drawn
    # with a fixed seed so that a registration repeats.
    sampling_fraction: float = 0.2
    seed: int = 7
    histogram_bins: int = 50
    iterations_per_level: int = 300

    def __post_init__(self) -> None:
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm):
            raise ValueError("shrink_factors and smoothing_sigmas_mm need one value per level")
        if not 0 < self.sampling_fraction <= 1:
            raise ValueError(f"sampling_fraction {self.sampling_fraction} is not in (0, 1]")
        if min(self.min_relative_gain, self.max_rotation_degrees, self.max_shift_mm) < 0:
            raise ValueError("the registration's margin and limits cannot be negative")

    def refusal(self, rigid: Rigid) -> str | None:
        """Why ``rigid``'s proposed motion must not replace the header geometry, or None."""
        gain = rigid.metric_after - rigid.metric_before
        if not gain >= self.min_relative_gain * abs(rigid.metric_before):
            return f"gain under the margin of {100 * self.min_relative_gain:g}%"
        if rigid.angle_degrees > self.max_rotation_degrees:
            return f"turn beyond {self.max_rotation_degrees:g} degrees, implausible for one session"
        if rigid.shift_mm > self.max_shift_mm:
            return f"shift beyond {self.max_shift_mm:g} mm, implausible for one session"
        return None


@dataclass(frozen=True)
class Rigid:
    """What a registration proposed for the moving series, and whether it was applied.

    The motion is the correction of the moving series' header geometry: a rotation about
    ``centre_mm`` (the centre of the head the metric sampled) and the displacement of that
    point, in patient LPS coordinates. ``kept_header`` says why the header geometry was
    kept instead; None means the motion was applied.
    """

    rotation_degrees: tuple[float, float, float]  # rotation vector, LPS axes
    translation_mm: tuple[float, float, float]  # displacement of centre_mm, LPS
    centre_mm: tuple[float, float, float]
    metric_before: float  # Mattes mutual information (nats) at the header geometry
    metric_after: float  # ... after the proposed motion
    seconds: float
    kept_header: str | None = None

    @property
    def applied(self) -> bool:
        return self.kept_header is None

    @property
    def angle_degrees(self) -> float:
        return float(np.linalg.norm(self.rotation_degrees))

    @property
    def shift_mm(self) -> float:
        return float(np.linalg.norm(self.translation_mm))

    def matrix(self) -> np.ndarray:
        """The proposed motion as a 4x4 map of patient space (LPS mm), from the moving
        series' header positions to its registered ones."""
        return rigid_matrix(
            np.asarray(self.rotation_degrees),
            np.asarray(self.translation_mm),
            np.asarray(self.centre_mm),
        )

    def describe(self) -> str:
        """One line for the pairing report: the motion, the metric, what was done and why."""
        if np.isnan(self.metric_before):
            return f"header geometry kept ({self.kept_header})"
        motion = f"{self.shift_mm:.1f} mm, {self.angle_degrees:.1f} degrees"
        metric = f"mutual information {self.metric_before:.3f} -> {self.metric_after:.3f}"
        if self.applied:
            return f"registered: moved {motion} from the header geometry ({metric})"
        return (
            f"header geometry kept ({self.kept_header}): registration proposed {motion} ({metric})"
        )


def rigid_matrix(
    rotation_degrees: np.ndarray, translation_mm: np.ndarray, centre_mm: np.ndarray
) -> np.ndarray:
    """The 4x4 rigid map that turns patient space by a rotation vector (degrees) about
    ``centre_mm`` and then shifts that point by ``translation_mm`` (LPS mm)."""
    rotation = Rotation.from_rotvec(rotation_degrees, degrees=True).as_matrix()
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre_mm + translation_mm - rotation @ centre_mm
    return matrix


def transformed(volume: Volume, matrix: np.ndarray) -> Volume:
    """``volume`` with its geometry moved by a rigid 4x4 map of patient space, pixels
    unchanged: every slice's position, the orientation and the slice normal."""
    rotation, shift = matrix[:3, :3], matrix[:3, 3]
    row, column = rotation @ volume.orientation[:3], rotation @ volume.orientation[3:]
    return replace(
        volume,
        positions=volume.positions @ rotation.T + shift,
        orientation=np.concatenate([row, column]),
        slice_normal=rotation @ volume.slice_normal,
    )


def register_rigid(
    moving: Volume,
    fixed: Volume,
    fixed_head: np.ndarray | None = None,
    moving_head: np.ndarray | None = None,
    settings: RegistrationSettings | None = None,
) -> tuple[Volume, Rigid]:
    """``moving`` re-placed onto ``fixed`` by a rigid registration, and what was proposed.

    ``fixed_head`` and ``moving_head`` are masks (S, H, W) of the head in each series, where
    the metric is measured (None: the whole series). The registration starts from the
    header geometry; its motion is applied only when it passes ``settings``' margin and
    limits, otherwise ``moving`` comes back as it was and the ``Rigid`` says why.
    """
    settings = settings or RegistrationSettings()
    started = time.perf_counter()
    # The metric samples the head of one series and reads the other at the same points;
    # points outside the other series are lost, and since a motion changes which are lost,
    # the metric would reward motions that merely trim the overlap. Sampling the series
    # whose head lies more within the other (a slab in a whole head) keeps the overlap whole.
    swap = _inside(moving, moving_head, fixed) > _inside(fixed, fixed_head, moving)
    sampled, sampled_head, other = (
        (moving, moving_head, fixed) if swap else (fixed, fixed_head, moving)
    )
    centre = _centre(sampled, sampled_head)
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centre.tolist())  # the identity: registration starts from the header
    try:
        before, after = _register(sampled, sampled_head, other, transform, settings)
    # ITK raises RuntimeError for whatever stops it, chiefly series that do not overlap.
    except RuntimeError as error:
        # ITK's message ends with its reason (after the class and address that raised it),
        # whose first sentence says what went wrong and the rest what to try.
        reason = str(error).strip().splitlines()[-1].split("): ", 1)[-1].split(". ")[0]
        failed = Rigid(
            rotation_degrees=(0.0, 0.0, 0.0),
            translation_mm=(0.0, 0.0, 0.0),
            centre_mm=_floats(centre),
            metric_before=float("nan"),
            metric_after=float("nan"),
            seconds=time.perf_counter() - started,
            kept_header=f"registration failed: {reason}",
        )
        return moving, failed

    # ITK's transform maps points of the sampled series to where the same anatomy lies in
    # the other. The moving series' geometry is corrected by the map from its header
    # positions to the fixed series' frame: the transform itself when the moving series was
    # the sampled one, its inverse otherwise.
    forward = np.eye(4)
    forward[:3, :3] = np.reshape(transform.GetMatrix(), (3, 3))
    forward[:3, 3] = np.array(transform.TransformPoint(centre.tolist())) - forward[:3, :3] @ centre
    correction = forward if swap else np.linalg.inv(forward)
    rigid = Rigid(
        rotation_degrees=_floats(Rotation.from_matrix(correction[:3, :3]).as_rotvec(degrees=True)),
        translation_mm=_floats(correction[:3, :3] @ centre + correction[:3, 3] - centre),
        centre_mm=_floats(centre),
        metric_before=before,
        metric_after=after,
        seconds=time.perf_counter() - started,
    )
    rigid = replace(rigid, kept_header=settings.refusal(rigid))
    return (transformed(moving, correction) if rigid.applied else moving), rigid


def sitk_image(volume: Volume, pixels: np.ndarray | None = None) -> sitk.Image:
    """A SimpleITK image of ``volume`` (or of ``pixels`` on its grid), placed in LPS mm.

    SimpleITK indexes (x, y, z) = (column, row, slice), the reverse of the array's axes,
    which is how GetImageFromArray reads an array. The slice axis is ``affine()``'s: an even
    step from the first slice to the last, across the slices even where a tilted stack makes
    it oblique to them.
    """
    affine = volume.affine()
    # One pixel type for both series: ITK registers images of the same type only.
    array = np.ascontiguousarray(volume.pixels if pixels is None else pixels)
    image = sitk.GetImageFromArray(array.astype(np.float32) if pixels is None else array)
    axes = affine[:3, [2, 1, 0]]  # along a row, down a column, across slices
    spacing = np.linalg.norm(axes, axis=0)
    image.SetOrigin(affine[:3, 3].tolist())
    image.SetSpacing(spacing.tolist())
    image.SetDirection((axes / spacing).ravel().tolist())
    return image


def _register(
    sampled: Volume,
    head: np.ndarray | None,
    other: Volume,
    transform: sitk.Euler3DTransform,
    settings: RegistrationSettings,
) -> tuple[float, float]:
    """Optimise ``transform`` in place; the metric before and after, on every voxel."""
    sampled_image, other_image = sitk_image(sampled), sitk_image(other)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(settings.sampling_fraction, settings.seed)
    if head is not None:
        # Two voxels beyond the head keep its outline (the scalp against air in a native
        # study, the brain's surface in a skull-stripped one) within what the metric sees.
        outline = ndimage.binary_dilation(head, iterations=2).astype(np.uint8)
        method.SetMetricFixedMask(sitk_image(sampled, outline))
    method.SetInterpolator(sitk.sitkLinear)
    # Steps are in mm of the largest voxel displacement they cause (the physical-shift
    # scales), rotations and translations alike; each reversal of the gradient shortens the
    # step by the relaxation factor. A 4 mm first step crosses the 15-20 mm and 15-degree
    # misplacements of the tests; 2 mm and a 0.5 relaxation stopped short of them.
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0,
        minStep=0.001,
        numberOfIterations=settings.iterations_per_level,
        relaxationFactor=0.7,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()

    def mutual_information() -> float:
        # MetricEvaluate reads every masked voxel at full resolution, ignoring the sampling:
        # before and after are measured on the same points. ITK reports it negated.
        method.SetInitialTransform(sitk.Euler3DTransform(transform), inPlace=True)
        return -float(method.MetricEvaluate(sampled_image, other_image))

    before = mutual_information()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(sampled_image, other_image)
    return before, mutual_information()


def _inside(volume: Volume, head: np.ndarray | None, other: Volume) -> float:
    """The fraction of ``volume``'s head (every fourth voxel each way) that lies within
    ``other``, by the headers."""
    mask = np.ones(volume.pixels.shape, dtype=bool) if head is None else head
    index = np.argwhere(mask[::4, ::4, ::4]) * 4.0
    if not len(index):
        return 0.0
    points = np.linalg.inv(other.affine()) @ volume.affine() @ np.c_[index, np.ones(len(index))].T
    upper = np.array(other.pixels.shape, dtype=float)[:, None] - 0.5
    return float(np.mean(np.all((points[:3] >= -0.5) & (points[:3] <= upper), axis=0)))


def _centre(volume: Volume, head: np.ndarray | None) -> np.ndarray:
    if head is not None and head.any():
        index = np.array(ndimage.center_of_mass(head))
    else:
        index = (np.array(volume.pixels.shape, dtype=float) - 1) / 2
    return (volume.affine() @ np.append(index, 1.0))[:3]


def _floats(values: np.ndarray) -> tuple[float, float, float]:
    first, second, third = (float(value) for value in values)
    return first, second, third


def resample_onto(moving: Volume, grid: Volume) -> tuple[np.ndarray, np.ndarray]:
    """``moving``'s intensities at every voxel centre of ``grid`` (linear), and where defined.

    Each grid slice is placed by its own ImagePositionPatient, so an unevenly spaced grid
    is still exact. A point is covered when it lies within half a voxel of ``moving``'s
    voxel centres along every axis; uncovered points get 0.
    """
    to_moving = np.linalg.inv(moving.affine())
    slices, rows, columns = grid.pixels.shape
    row_index, column_index = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    in_plane = grid.affine()[:3, 1:3]
    upper = np.array(moving.pixels.shape, dtype=float)[:, None] - 0.5
    resampled = np.zeros(grid.pixels.shape, dtype=np.float32)
    covered = np.zeros(grid.pixels.shape, dtype=bool)
    for index in range(slices):
        points = in_plane @ np.stack([row_index.ravel(), column_index.ravel()])
        points += grid.positions[index][:, None]
        coordinates = to_moving[:3, :3] @ points + to_moving[:3, 3:]
        inside = np.all((coordinates >= -0.5) & (coordinates <= upper), axis=0)
        # "nearest" extends the edge voxels by the half voxel counted as covered above.
        values = ndimage.map_coordinates(moving.pixels, coordinates, order=1, mode="nearest")
        resampled[index] = np.where(inside, values, 0.0).reshape(rows, columns)
        covered[index] = inside.reshape(rows, columns)
    return resampled, covered


@dataclass(frozen=True, eq=False)
class Placement:
    """A series placed on another's grid: what training pairs and the monitor score."""

    volume: Volume  # the moving series with its geometry as placed (registered, or header)
    resampled: np.ndarray  # float32 (S, H, W): its intensities on the grid
    covered: np.ndarray  # bool (S, H, W): grid voxels that lie inside it
    # None: same grid, taken voxel for voxel (or no registration asked for); otherwise what
    # the registration proposed and whether it was applied.
    registration: Rigid | None


def place_onto(
    moving: Volume,
    grid: Volume,
    grid_head: np.ndarray,
    moving_head: np.ndarray,
    register: bool = True,
) -> Placement:
    """``moving`` resampled onto ``grid``: by the header geometry, refined by
    ``register_rigid`` (with ``register``) where the two were acquired on different grids;
    series on the same grid (co-registered) are taken voxel for voxel."""
    rigid = None
    if register and not same_grid(grid, moving):
        moving, rigid = register_rigid(moving, grid, grid_head, moving_head)
    resampled, covered = resample_onto(moving, grid)
    return Placement(moving, resampled, covered, rigid)


def same_grid(first: Volume, second: Volume) -> bool:
    """Whether two series have the same voxels in space (shape and affine)."""
    return first.pixels.shape == second.pixels.shape and np.allclose(
        first.affine(), second.affine(), atol=1e-3
    )
