"""Reading one series of images into a volume ordered in space.

Slices are ordered by where they are, not by how they are numbered: ImagePositionPatient
projected onto the slice normal (the cross product of the two direction cosines of
ImageOrientationPatient). InstanceNumber runs in acquisition order, which is descending,
interleaved or restarted on many scanners. A multi-frame (Enhanced MR) file gives one slice
per frame, placed by its functional groups (``pipeline.dicom.multiframe``).

Pixel values are the stored values with RescaleSlope/RescaleIntercept applied, slice by slice
(Philips varies the slope between slices). Neither MR Real World Value Mapping nor Philips'
private scale slope (2005,100E) is applied: MR intensities have no physical unit, the model
normalises each volume anyway, and these mappings are absent on most scanners, so applying
them would make the same contrast look different depending on the vendor.

Every reason a series cannot become a volume is a SeriesError whose message an admin can
act on; the job that loaded the series fails with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.dicom.multiframe import is_multi_frame, split_frames

# Direction cosines are written with 4 to 8 decimals depending on the vendor; 1e-3 (about
# 0.06 degrees) absorbs that rounding and nothing a real tilted slice would produce.
ORIENTATION_TOLERANCE = 1e-3
# Relative difference above which two PixelSpacing values are different grids.
SPACING_TOLERANCE = 1e-3
# Two slices closer than this along the normal (mm) are at the same place: several echoes,
# time points or repeated acquisitions stacked into one series.
DUPLICATE_TOLERANCE_MM = 0.01
# Gaps that differ from the median gap by more than this fraction make the spacing non-uniform.
GAP_TOLERANCE = 0.01


class SeriesError(Exception):
    """A series that cannot be read into a volume; the message says why, for an admin."""


@dataclass(frozen=True, eq=False)
class Volume:
    """A series as a 3-D array with its geometry, slices ordered along ``slice_normal``.

    All arrays are read-only so that a volume shared by several stages cannot be changed
    behind their backs.
    """

    pixels: np.ndarray  # float32 (S, H, W): rescaled values, [slice, row, column]
    headers: list[Dataset]  # each slice's dataset without PixelData, same order as pixels
    positions: np.ndarray  # (S, 3) ImagePositionPatient of each slice, LPS mm
    orientation: np.ndarray  # (6,) row direction cosines, then column direction cosines
    pixel_spacing: np.ndarray  # (2,) PixelSpacing: between rows, between columns (mm)
    slice_normal: np.ndarray  # (3,) unit vector, row x column; slices ascend along it
    # Each slice's frame number (from 1) in its multi-frame instance, None for a single-frame
    # instance; empty for a volume not read from files.
    frames: tuple[int | None, ...] = ()

    @property
    def slice_offsets(self) -> np.ndarray:
        """Each slice's distance along the normal (mm), ascending."""
        return self.positions @ self.slice_normal

    @property
    def slice_gaps(self) -> np.ndarray:
        """The S-1 distances between neighbouring slices along the normal (mm)."""
        return np.diff(self.slice_offsets)

    @property
    def slice_spacing(self) -> float:
        """The median gap between neighbouring slices (mm)."""
        return float(np.median(self.slice_gaps))

    @property
    def voxel_mm3(self) -> float:
        """A voxel's volume: the pixel's area times the slice spacing, or the slice
        thickness (1 mm when not given) for a single slice."""
        if len(self.pixels) > 1:
            depth = self.slice_spacing
        else:
            thickness = self.headers[0].get("SliceThickness") if self.headers else None
            depth = float(thickness or 1.0)
        return depth * float(np.prod(self.pixel_spacing))

    @property
    def uniform_spacing(self) -> bool:
        """Whether all gaps equal the median gap (within 1%); if not, use ``positions``."""
        return bool(
            np.all(
                np.abs(self.slice_gaps - self.slice_spacing) <= GAP_TOLERANCE * self.slice_spacing
            )
        )

    def affine(self) -> np.ndarray:
        """The 4x4 matrix taking (slice, row, column, 1) indices of ``pixels`` to LPS mm.

        The index order is the array's axis order, as scipy.ndimage expects. The slice axis
        goes from the first to the last position in equal steps; for a non-uniform series
        this is an approximation and ``positions`` holds the truth.
        """
        row_cosines, column_cosines = self.orientation[:3], self.orientation[3:]
        row_spacing, column_spacing = self.pixel_spacing
        step = (self.positions[-1] - self.positions[0]) / (len(self.positions) - 1)
        affine = np.eye(4)
        affine[:3, 0] = step
        affine[:3, 1] = column_cosines * row_spacing  # moving down one row
        affine[:3, 2] = row_cosines * column_spacing  # moving right one column
        affine[:3, 3] = self.positions[0]
        return affine


def load_series(paths: Sequence[Path]) -> Volume:
    """Read the files of one series into a Volume ordered along the slice normal.

    A multi-frame (Enhanced MR) file gives one slice per frame. Raises SeriesError when the
    files do not make one volume of parallel slices on one grid, naming the first offending
    file (and frame).
    """
    if not paths:
        raise SeriesError("series has no slices; synthesis needs at least 2")
    slices = [piece for path in paths for piece in _slices(Path(path))]
    if len(slices) < 2:
        raise SeriesError("series has a single slice; synthesis needs at least 2")
    names = [piece.name for piece in slices]
    datasets = [piece.header for piece in slices]
    _check_same(names, datasets, "SeriesInstanceUID", "files belong to different series")
    _check_same(names, datasets, "FrameOfReferenceUID", "slices have different frames of reference")
    _check_same_size(names, datasets)

    orientations = [
        _numbers(name, ds, "ImageOrientationPatient", 6)
        for name, ds in zip(names, datasets, strict=True)
    ]
    positions = np.array(
        [
            _numbers(name, ds, "ImagePositionPatient", 3)
            for name, ds in zip(names, datasets, strict=True)
        ]
    )
    spacings = [
        _numbers(name, ds, "PixelSpacing", 2) for name, ds in zip(names, datasets, strict=True)
    ]
    orientation = _common_orientation(names, orientations)
    pixel_spacing = _common_spacing(names, spacings)
    normal = np.cross(orientation[:3], orientation[3:])

    offsets = positions @ normal
    order = np.argsort(offsets, kind="stable")
    _check_no_duplicates([names[i] for i in order], offsets[order])

    pixels = np.stack([_rescaled(slices[i]) for i in order])
    if pixels.min() == pixels.max():
        raise SeriesError("all slices are blank (every pixel has the same value)")
    return Volume(
        pixels=_read_only(pixels),
        headers=[datasets[i] for i in order],
        positions=_read_only(positions[order]),
        orientation=_read_only(orientation),
        pixel_spacing=_read_only(pixel_spacing),
        slice_normal=_read_only(normal),
        frames=tuple(slices[i].frame for i in order),
    )


@dataclass(frozen=True, eq=False)
class _Slice:
    name: str  # the file, and for a multi-frame file the frame: for messages
    header: Dataset  # single-frame: the file's dataset; multi-frame: the frame's header
    frame: int | None  # from 1, in a multi-frame file
    stored: np.ndarray | None  # a frame's stored values; None: decode the header's PixelData


def _slices(path: Path) -> list[_Slice]:
    dataset = _read(path)
    _check_image(path.name, dataset)
    try:
        if not is_multi_frame(dataset):
            return [_Slice(path.name, dataset, None, None)]
        frames = split_frames(dataset)
    except ValueError as error:
        raise SeriesError(f"instance {path.name} has {error}") from error
    stored = _decode(path.name, dataset)
    if stored.ndim == 2:
        stored = stored[None]
    if stored.ndim != 3 or stored.shape[0] != len(frames):
        raise SeriesError(
            f"instance {path.name} has {len(frames)} frames but pixel data of shape {stored.shape}"
        )
    del dataset.PixelData
    return [
        _Slice(f"{path.name} frame {number}", header, number, stored[number - 1])
        for number, header in frames
    ]


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    # pydicom raises many kinds of exception on damaged input (struct.error, KeyError,
    # ValueError, EOFError...); whichever it is, the file is unreadable.
    except Exception as error:
        raise SeriesError(f"cannot read {path.name} as DICOM: {error}") from error


def _check_image(name: str, dataset: Dataset) -> None:
    if "PixelData" not in dataset:
        raise SeriesError(f"instance {name} has no pixel data")
    photometric = dataset.get("PhotometricInterpretation", "")
    # MONOCHROME1 is refused rather than inverted: for MR it is an export display choice,
    # and whether its stored values still rise with signal cannot be known from the header.
    if photometric != "MONOCHROME2":
        raise SeriesError(
            f"instance {name} has photometric interpretation {photometric or '(none)'}; "
            "only MONOCHROME2 (grayscale) images are supported"
        )


def _check_same(names: list[str], datasets: list[Dataset], keyword: str, problem: str) -> None:
    first = datasets[0].get(keyword)
    for name, dataset in zip(names, datasets, strict=True):
        if dataset.get(keyword) != first:
            raise SeriesError(f"{problem}: {names[0]} and {name} differ in {keyword}")


def _check_same_size(names: list[str], datasets: list[Dataset]) -> None:
    sizes = [(dataset.get("Rows"), dataset.get("Columns")) for dataset in datasets]
    for name, (rows, columns) in zip(names, sizes, strict=True):
        if not rows or not columns:
            raise SeriesError(f"instance {name} has no Rows or Columns")
        if (rows, columns) != sizes[0]:
            raise SeriesError(
                f"slices have different sizes: {sizes[0][0]}x{sizes[0][1]} and {rows}x{columns} "
                f"(rows x columns, {names[0]} and {name})"
            )


def _numbers(name: str, dataset: Dataset, keyword: str, count: int) -> np.ndarray:
    value = dataset.get(keyword)
    if value is None or value == "":
        raise SeriesError(f"instance {name} has no {keyword}; its slice cannot be placed in space")
    items = value if isinstance(value, MultiValue) else [value]
    try:
        numbers = np.array([float(item) for item in items])
    except (TypeError, ValueError) as error:
        raise SeriesError(f"instance {name} has an unreadable {keyword}: {value!r}") from error
    if numbers.shape != (count,) or not np.all(np.isfinite(numbers)):
        raise SeriesError(f"instance {name} has {keyword} {value!r}; expected {count} numbers")
    return numbers


def _common_orientation(names: list[str], orientations: list[np.ndarray]) -> np.ndarray:
    first = orientations[0]
    for name, orientation in zip(names, orientations, strict=True):
        if np.max(np.abs(orientation - first)) > ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"slices are not parallel: {names[0]} and {name} differ in ImageOrientationPatient"
            )
    row, column = first[:3], first[3:]
    row_norm, column_norm = np.linalg.norm(row), np.linalg.norm(column)
    if (
        abs(row_norm - 1) > ORIENTATION_TOLERANCE
        or abs(column_norm - 1) > ORIENTATION_TOLERANCE
        or abs(row @ column) > ORIENTATION_TOLERANCE
    ):
        raise SeriesError(
            f"ImageOrientationPatient of {names[0]} is not two perpendicular unit vectors"
        )
    # Normalised so that the normal, the projections and the affine are exact.
    return np.concatenate([row / row_norm, column / column_norm])


def _common_spacing(names: list[str], spacings: list[np.ndarray]) -> np.ndarray:
    first = spacings[0]
    if np.any(first <= 0):
        raise SeriesError(
            f"instance {names[0]} has PixelSpacing {first.tolist()}; spacings must be positive"
        )
    for name, spacing in zip(names, spacings, strict=True):
        if np.any(np.abs(spacing - first) > SPACING_TOLERANCE * first):
            raise SeriesError(
                f"slices have different pixel spacings: {first[0]:g}x{first[1]:g} mm ({names[0]}) "
                f"and {spacing[0]:g}x{spacing[1]:g} mm ({name})"
            )
    return first


def _check_no_duplicates(names: list[str], offsets: np.ndarray) -> None:
    for index in np.flatnonzero(np.diff(offsets) < DUPLICATE_TOLERANCE_MM):
        raise SeriesError(
            f"instances {names[index]} and {names[index + 1]} are at the same position "
            f"({offsets[index]:.2f} mm along the slice normal); series with several echoes or "
            "time points per position are not supported"
        )


def _rescaled(piece: _Slice) -> np.ndarray:
    """The slice's float32 pixels with its rescale applied. A single-frame file's PixelData
    is dropped once decoded, to halve peak memory."""
    stored = piece.stored
    if stored is None:
        stored = _decode(piece.name, piece.header)
        del piece.header.PixelData
    if stored.ndim != 2:
        raise SeriesError(
            f"instance {piece.name} holds {stored.ndim}-D pixel data; expected one grayscale frame"
        )
    slope = _float_or(piece.header.get("RescaleSlope"), 1.0)
    intercept = _float_or(piece.header.get("RescaleIntercept"), 0.0)
    if slope == 0:
        raise SeriesError(f"instance {piece.name} has RescaleSlope 0, which would blank the image")
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _decode(name: str, dataset: Dataset) -> np.ndarray:
    try:
        # Honours PixelRepresentation and BitsStored (sign extension of signed values) and
        # decodes compressed transfer syntaxes through the installed pylibjpeg plugins.
        return dataset.pixel_array
    # The decoders raise whatever their C libraries report; any failure means the same thing.
    except Exception as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
        name_of_syntax = getattr(syntax, "name", syntax)
        raise SeriesError(
            f"pixel data of {name} cannot be decoded ({name_of_syntax}): {error}"
        ) from error


def _float_or(value: object, default: float) -> float:
    # RescaleSlope/Intercept are Type 1 only when present; empty or absent means identity.
    return default if value is None or value == "" else float(value)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array
