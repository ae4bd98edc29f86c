"""Showing the models slices as they learnt them: axial, with pixels of their size.

The models learnt axial slices: rows running from the front of the head to the back,
columns from the patient's right to the left. Tilted axial slices (the native study's T2 is
17 degrees off) are still axial and go in as they are. A sagittal or coronal series is
not: a 2D one (slices 4-6 mm apart) has no axial view worth the name and is refused, but a
3D one (the sagittal MPRAGE of most brain protocols, slices about as far apart as its
pixels) is the same head on a near-cubic grid. Its axial view is its pixel array with the
axes swapped and flipped: no interpolation, and the network's output swaps back onto the
source's own grid exactly. So the synthetic series keeps the source's geometry slice for
slice, whatever the plane, and a viewer links and reformats it like the source.

A U-Net is not scale-invariant: it learnt anatomy at the training data's pixel size (about
1 mm). Shown a 512-matrix T2 with 0.45 mm pixels, the same brain at twice the size, the
shipped t1-to-t2 model's output correlated 0.47 with the real T2 instead of 0.83 (a
brats-met-00110 slice upsampled to 0.5 mm). So slices whose pixels are far from the model's
size are resampled to it in-plane for the network, and its output back onto the slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from pipeline.dicom.volume import SeriesError, Volume

# Slices tilted more than this from axial are another plane.
MAX_TILT_FROM_AXIAL_DEGREES = 40.0
# The axial view of a 3D series has the source's slice spacing along one of its axes: its
# pixels may be this much longer than wide. Beyond that the model would see a squashed
# head (a 2D sagittal series' view has pixels 4-6 times longer than wide).
MAX_PIXEL_ASPECT = 1.5
# Pixels within this fraction of the model's pixel size go in as they are: resampling costs
# sharpness, and the training data's own grids spread over 0.88-1 mm.
PIXEL_SIZE_TOLERANCE = 0.25
# Unit vectors of the patient's axes (LPS): a row of an axial image runs along x, a column
# along y, and the slices ascend along z.
_X, _Y, _Z = np.eye(3)


@dataclass(frozen=True)
class AxialView:
    """The source volume's pixels seen as axial slices, and the way back."""

    pixels: np.ndarray  # (slices, rows, columns) of the view
    pixel_spacing: tuple[float, float]  # of the view's slices: between rows, between columns
    slice_offsets: np.ndarray  # (slices,) the view's slices along their normal, mm, ascending
    axes: tuple[int, int, int]  # the source array's axis that each view axis is
    flips: tuple[bool, bool, bool]  # view axes that run against the source's
    plane: str  # the source's plane: axial, sagittal or coronal

    @property
    def reformatted(self) -> bool:
        return self.axes != (0, 1, 2)

    def to_source(self, view: np.ndarray) -> np.ndarray:
        """An array on the view's grid (e.g. the network's output) on the source's grid."""
        flipped = [axis for axis, flip in enumerate(self.flips) if flip]
        return np.transpose(np.flip(view, flipped), np.argsort(self.axes))


def axial_view(volume: Volume) -> AxialView:
    """The axial view of ``volume``: itself when its slices are axial (tilted up to
    MAX_TILT_FROM_AXIAL_DEGREES), else its axes swapped when it is a 3D series.

    Raises SeriesError naming the plane and the spacings when it has no axial view.
    """
    tilt = _tilt_from_axial(volume.slice_normal)
    plane = _plane(volume.slice_normal)
    if tilt <= MAX_TILT_FROM_AXIAL_DEGREES:
        spacing = (float(volume.pixel_spacing[0]), float(volume.pixel_spacing[1]))
        return AxialView(
            volume.pixels,
            spacing,
            volume.slice_offsets,
            (0, 1, 2),
            (False, False, False),
            "axial",
        )

    affine = volume.affine()
    directions = [affine[:3, axis] / np.linalg.norm(affine[:3, axis]) for axis in range(3)]
    spacings = [volume.slice_spacing, *volume.pixel_spacing]
    # The view's slices ascend along whichever in-plane axis of the source is nearest the
    # patient's z; of the other two, the one nearer y becomes the view's rows.
    slice_axis = max((1, 2), key=lambda axis: abs(directions[axis] @ _Z))
    rest = [axis for axis in (0, 1, 2) if axis != slice_axis]
    row_axis = max(rest, key=lambda axis: abs(directions[axis] @ _Y))
    column_axis = next(axis for axis in rest if axis != row_axis)
    axes = (slice_axis, row_axis, column_axis)

    view_tilt = _tilt_from_axial(directions[slice_axis])
    aspect = max(spacings[row_axis], spacings[column_axis]) / min(
        spacings[row_axis], spacings[column_axis]
    )
    problem = None
    if not volume.uniform_spacing:
        problem = "its slices are not evenly spaced"
    elif aspect > MAX_PIXEL_ASPECT:
        problem = (
            f"its slices are {volume.slice_spacing:.2g} mm apart against "
            f"{min(volume.pixel_spacing):.2g} mm pixels (a 3D series, at most "
            f"{MAX_PIXEL_ASPECT:g} times the pixel spacing, can be)"
        )
    elif view_tilt > MAX_TILT_FROM_AXIAL_DEGREES:
        problem = f"its axial view would still be {view_tilt:.0f} degrees from axial"
    if problem:
        raise SeriesError(
            f"the slices are {plane} ({tilt:.0f} degrees from axial); the models synthesize "
            f"axial slices, and this series cannot be turned to axial: {problem}"
        )

    wanted = (_Z, _Y, _X)
    flips = tuple(bool(directions[axis] @ wanted[index] < 0) for index, axis in enumerate(axes))
    flipped = [index for index, flip in enumerate(flips) if flip]
    pixels = np.flip(np.transpose(volume.pixels, axes), flipped)
    spacing = (float(spacings[row_axis]), float(spacings[column_axis]))
    offsets = np.arange(pixels.shape[0]) * float(spacings[slice_axis])
    return AxialView(np.ascontiguousarray(pixels), spacing, offsets, axes, flips, plane)


def axial_volume(volume: Volume) -> Volume:
    """``volume`` itself when it is axial, else its axial view with the view's geometry (and
    no headers: its slices are no source instance's). For training and evaluation, which
    want the slices the models see placed in space; raises as ``axial_view`` does."""
    view = axial_view(volume)
    if not view.reformatted:
        return volume
    affine = volume.affine()
    shape = volume.pixels.shape
    steps = []  # the move in patient space (mm) of one step along each view axis
    first = [0, 0, 0]  # the source index of the view's first voxel
    for axis, flip in zip(view.axes, view.flips, strict=True):
        steps.append(affine[:3, axis] * (-1 if flip else 1))
        first[axis] = shape[axis] - 1 if flip else 0
    origin = affine[:3] @ [*first, 1]
    spacing = np.array([np.linalg.norm(steps[1]), np.linalg.norm(steps[2])])
    row_cosines, column_cosines = steps[2] / spacing[1], steps[1] / spacing[0]
    view.pixels.setflags(write=False)
    return Volume(
        pixels=view.pixels,
        headers=[],
        positions=origin + np.arange(view.pixels.shape[0])[:, None] * steps[0],
        orientation=np.concatenate([row_cosines, column_cosines]),
        pixel_spacing=spacing,
        slice_normal=np.cross(row_cosines, column_cosines),
    )


def working_shape(
    shape: Sequence[int], pixel_spacing: Sequence[float], model_pixel_mm: float
) -> tuple[int, int] | None:
    """The (rows, columns) that give a slice of ``shape`` pixels of about ``model_pixel_mm``
    over the same extent; None when its pixels are within PIXEL_SIZE_TOLERANCE of that."""
    spacing = np.asarray(pixel_spacing, dtype=float)
    if np.all(np.abs(spacing / model_pixel_mm - 1) <= PIXEL_SIZE_TOLERANCE):
        return None
    extent = (np.asarray(shape[-2:]) - 1) * spacing  # first to last pixel centre, mm
    rows, columns = np.maximum(2, np.round(extent / model_pixel_mm).astype(int) + 1)
    return int(rows), int(columns)


def resize_slices(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Each slice of ``volume`` (S, H, W) resampled to ``shape`` (rows, columns), bilinear,
    the first and last pixel centres kept in place; smoothed first where it shrinks, so
    that fine noise does not alias into the coarser grid."""
    factors = np.array(shape, dtype=float) / np.array(volume.shape[1:])
    sigmas = np.maximum(0.0, (1 / factors - 1) / 2)
    if np.any(sigmas > 0):
        volume = ndimage.gaussian_filter(volume, (0.0, *sigmas))
    return ndimage.zoom(volume, (1.0, *factors), order=1, grid_mode=False)


def at_pixel_size(volume: Volume, model_pixel_mm: float) -> Volume:
    """``volume`` resampled in-plane as the models see it (itself when close enough), with
    its geometry; for training, which must learn the slices inference will show."""
    shape = working_shape(volume.pixels.shape, volume.pixel_spacing, model_pixel_mm)
    if shape is None:
        return volume
    pixels = resize_slices(volume.pixels, shape)
    pixels.setflags(write=False)
    old = np.array(volume.pixels.shape[1:]) - 1
    return replace(
        volume,
        pixels=pixels,
        headers=[],
        pixel_spacing=volume.pixel_spacing * old / (np.array(shape) - 1),
        frames=(),
    )


def _tilt_from_axial(direction: np.ndarray) -> float:
    return float(np.degrees(np.arccos(min(1.0, abs(float(direction @ _Z))))))


def _plane(normal: np.ndarray) -> str:
    if _tilt_from_axial(normal) <= MAX_TILT_FROM_AXIAL_DEGREES:
        return "axial"
    return "sagittal" if abs(normal[0]) > abs(normal[1]) else "coronal"
