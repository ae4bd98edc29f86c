"""Rigid refinement of two series' alignment, starting from their DICOM geometry.

Two series of one study share a frame of reference, so their headers place them in the
same patient space; but the patient may move between series, and in this project's native
study the headers alone leave the T1 about 17 mm and 16 degrees off the T2 (visible in
docs/figures/native-alignment.png). A pair that is off by that much teaches the network
a wrong mapping, so series acquired on different grids are registered: a rotation about
the grid's centre and a translation, found by maximising the correlation of the two
images' edge strength (gradient magnitude) inside the head. Edges, unlike intensities,
sit in the same places in T1 and T2, whose tissue contrasts are inverted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation

from pipeline.volume import Volume

# In-plane subsampling for the search: 1.8 mm pixels; at 3.6 mm the search lost its way.
SEARCH_STRIDE = 2
EDGE_SIGMA = 1.0  # pixels of the subsampled grid: smooths noise before the gradient
# Search bounds: patients move millimetres between series, and headers that are off by
# more than this would need a person to look at them, not an optimiser.
MAX_TRANSLATION_MM = 40.0
MAX_ROTATION_DEGREES = 25.0


@dataclass(frozen=True)
class Rigid:
    rotation_degrees: tuple[float, float, float]  # rotation vector about the grid's centre
    translation_mm: tuple[float, float, float]  # LPS
    correlation_before: float
    correlation_after: float

    def describe(self) -> str:
        angle = float(np.linalg.norm(self.rotation_degrees))
        shift = float(np.linalg.norm(self.translation_mm))
        return (
            f"registered: moved {shift:.1f} mm, turned {angle:.1f} degrees from the header "
            f"geometry (edge correlation {self.correlation_before:.3f} -> "
            f"{self.correlation_after:.3f})"
        )


def moved(
    volume: Volume, rotation_degrees: np.ndarray, translation: np.ndarray, centre: np.ndarray
) -> Volume:
    """``volume`` with its geometry turned about ``centre`` and shifted (pixels unchanged)."""
    matrix = Rotation.from_rotvec(np.radians(rotation_degrees)).as_matrix()
    orientation = np.concatenate([matrix @ volume.orientation[:3], matrix @ volume.orientation[3:]])
    return replace(
        volume,
        positions=(volume.positions - centre) @ matrix.T + centre + translation,
        orientation=orientation,
        slice_normal=matrix @ volume.slice_normal,
    )


def register_rigid(moving: Volume, grid: Volume, head: np.ndarray) -> tuple[Volume, Rigid]:
    """``moving`` re-placed so that its edges best match ``grid``'s inside ``head`` (a mask
    on ``grid``), and the transform found. Starts from the header geometry (no change)."""
    coarse = Volume(
        pixels=grid.pixels[:, ::SEARCH_STRIDE, ::SEARCH_STRIDE],
        headers=[],
        positions=grid.positions,
        orientation=grid.orientation,
        pixel_spacing=grid.pixel_spacing * SEARCH_STRIDE,
        slice_normal=grid.slice_normal,
    )
    mask = ndimage.binary_erosion(head[:, ::SEARCH_STRIDE, ::SEARCH_STRIDE], iterations=2)
    fixed_edges = _edges(coarse.pixels)
    shape = np.array(grid.pixels.shape, dtype=float)
    centre = (grid.affine() @ np.append((shape - 1) / 2, 1.0))[:3]

    def correlation(parameters: np.ndarray) -> float:
        candidate = moved(moving, parameters[:3], parameters[3:], centre)
        resampled, covered = resample_onto(candidate, coarse)
        where = mask & covered
        if where.sum() < 0.5 * mask.sum():
            return -1.0  # mostly outside the slab: no evidence, never preferred
        return float(np.corrcoef(_edges(resampled)[where], fixed_edges[where])[0, 1])

    bounds = [(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)] * 3 + [
        (-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM)
    ] * 3
    start = np.zeros(6)
    before = correlation(start)
    result = optimize.minimize(
        lambda p: -correlation(p),
        start,
        method="Powell",
        bounds=bounds,
        options={"xtol": 0.2, "ftol": 1e-4, "maxfev": 600},
    )
    best = result.x if -result.fun > before else start
    rigid = Rigid(
        rotation_degrees=tuple(float(v) for v in best[:3]),
        translation_mm=tuple(float(v) for v in best[3:]),
        correlation_before=before,
        correlation_after=max(before, float(-result.fun)),
    )
    return moved(moving, best[:3], best[3:], centre), rigid


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


def _edges(volume: np.ndarray) -> np.ndarray:
    smooth = np.stack([ndimage.gaussian_filter(image, EDGE_SIGMA) for image in volume])
    return np.hypot(ndimage.sobel(smooth, axis=1), ndimage.sobel(smooth, axis=2))
