"""The U-Net's pre- and post-processing: intensity normalisation, input channels, stored pixels.

Training and inference both call these functions, and a model's card names the
normalisation it was trained with, so the network always sees what it learnt on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.choices import Choice


class Normalization(Choice):
    """How a volume's intensities are mapped for the network (see normalize_volume)."""

    MINMAX_SLICE = "minmax-slice"
    PERCENTILE_VOLUME = "percentile-volume"
    SCALE_VOLUME = "scale-volume"
    MEDIAN_VOLUME = "median-volume"


# percentile-volume maps these percentiles of the foreground to 0 and 1, scale-volume the
# high one to 1: robust to the few hot voxels (vessels, fat, artefacts) that would set the
# scale of a plain min-max.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

# median-volume puts the foreground's median here. The brain is most of a head's foreground,
# so its median is brain tissue with or without the skull; the brightest tissue (fat on T1,
# fluid on T2) lies at 1.3 to 2.2 times the median in the shared studies, under the ceiling.
MEDIAN_LEVEL = 0.5

# The top of the normalised range, and of what the network's output is stored as. Fluid,
# oedema and fat lie above the foreground's 99.5th percentile (up to 2.0 times it in the
# shared studies); scale-volume keeps them distinct instead of flattening them to one value.
OUTPUT_CEILING = 2.0

# Sobel's kernel is a [1, 2, 1] smoothing (sum 4) times a [-1, 0, 1] difference over two
# pixels; dividing by 8 makes it the intensity change per pixel, so a channel stays within
# [-0.5, 0.5] for an image in [0, 1] and has the scale of the image channel.
SOBEL_SCALE = 1.0 / 8.0

# Stored pixels: [0, OUTPUT_CEILING] maps linearly onto 0..4095 (BitsStored 12, the depth of
# most MR scanners' images).
BITS_STORED = 12
STORED_MAX = 2**BITS_STORED - 1


@dataclass(frozen=True)
class StoredPixels:
    """Pixels of a synthetic series as stored, and the window a viewer opens them with.

    ``window_center`` and ``window_width`` are in stored values (rescale slope 1, intercept 0).
    """

    pixels: np.ndarray
    bits_stored: int
    window_center: float
    window_width: float


def foreground_threshold(volume: np.ndarray) -> float:
    """Intensity that separates the head (or brain) from the background of an MR volume.

    FSL BET's rule (Smith 2002): 10% of the way from the 2nd to the 98th percentile. It holds
    for skull-stripped volumes (background exactly 0) and for native ones (noisy background
    with the skull), where Otsu's threshold cuts through dark tissue such as CSF on T1.
    """
    low, high = np.percentile(volume, [2, 98])
    return float(low + 0.1 * (high - low))


def head_mask(volume: np.ndarray) -> np.ndarray:
    """The head (or skull-stripped brain) of a volume (S, H, W): above the foreground
    threshold, holes filled slice by slice so that dark CSF, air sinuses and tumour cores
    inside the head count as head."""
    above = volume > foreground_threshold(volume)
    return np.stack([ndimage.binary_fill_holes(image) for image in above])


def normalize_volume(volume: np.ndarray, method: Normalization) -> np.ndarray:
    """Map a rescaled float volume (slices, H, W) to the space the network works in.

    ``minmax-slice``: the paper's per-slice min-max to [0, 1] (a constant slice becomes zeros).
    ``percentile-volume``: the foreground's 0.5th..99.5th percentiles of the whole volume
    map to 0..1, clipped, so every slice of a series is scaled alike.
    ``scale-volume``: the volume divided by its foreground's 99.5th percentile, clipped to
    [0, OUTPUT_CEILING]. No offset: an MR magnitude image's zero is physical (no signal), so
    air stays at 0 and the darkest tissue keeps its contrast against it, where an offset
    pushes the background below 0 and the clip makes a slice's minimum arbitrary.
    ``median-volume``: the volume divided by twice its foreground's median, clipped to
    [0, OUTPUT_CEILING]. The percentiles of the other two are set by the brightest tissue,
    which is scalp fat where there is a skull and white matter or fluid where there is
    none, so the same brain lands 3.5 times darker on a native T1 than skull-stripped; the
    median is brain tissue either way (docs/ablation.md).

    Raises ValueError for an unknown method, a volume that is not 3-D, or one with no contrast.
    """
    try:
        method = Normalization(method)
    except ValueError:
        known = ", ".join(Normalization)
        raise ValueError(f"unknown normalization {method!r}; known: {known}") from None
    if volume.ndim != 3:
        raise ValueError(f"expected a volume (slices, rows, columns), got shape {volume.shape}")
    volume = volume.astype(np.float32, copy=False)
    if not volume.size or volume.min() == volume.max():
        raise ValueError("the volume has no contrast (every voxel has the same value)")

    if method is Normalization.MINMAX_SLICE:
        low = volume.min(axis=(1, 2), keepdims=True)
        span = volume.max(axis=(1, 2), keepdims=True) - low
        return np.divide(volume - low, span, out=np.zeros_like(volume), where=span > 0)

    foreground = volume[volume > foreground_threshold(volume)]
    if method is Normalization.MEDIAN_VOLUME:
        median = float(np.median(foreground))
        if median <= 0:
            raise ValueError("the volume's foreground has no positive signal")
        scaled = volume * (MEDIAN_LEVEL / median)
        return np.clip(scaled, 0.0, OUTPUT_CEILING).astype(np.float32)
    low, high = np.percentile(foreground, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if method is Normalization.SCALE_VOLUME:
        if high <= 0:
            raise ValueError("the volume's foreground has no positive signal")
        return np.clip(volume / high, 0.0, OUTPUT_CEILING).astype(np.float32)
    if high <= low:
        raise ValueError("the volume's foreground has no contrast")
    return np.clip((volume - low) / (high - low), 0.0, 1.0).astype(np.float32)


def normalized_ceiling(method: Normalization) -> float:
    """The largest value ``normalize_volume(..., method)`` gives."""
    if method in (Normalization.SCALE_VOLUME, Normalization.MEDIAN_VOLUME):
        return OUTPUT_CEILING
    return 1.0


def neighbour_slices(
    normalized: np.ndarray, slice_offsets: np.ndarray, distance_mm: float
) -> np.ndarray:
    """Each slice's neighbours ``distance_mm`` below and above it along the slice normal,
    (S, 2, H, W): linear between the two slices around each point, the end slice beyond
    the ends of the volume.

    At a fixed distance in millimetres, not a fixed number of slices, so a 1 mm volume and
    a 5 mm slab show the network the same anatomy around a slice. ``slice_offsets`` (S,)
    are the slices' positions along the normal (mm), ascending.
    """
    offsets = np.asarray(slice_offsets, dtype=np.float64)
    if offsets.shape != (normalized.shape[0],) or np.any(np.diff(offsets) <= 0):
        raise ValueError("slice offsets must ascend strictly, one per slice")
    indices = np.arange(offsets.size, dtype=np.float64)
    neighbours = np.empty((normalized.shape[0], 2, *normalized.shape[1:]), dtype=np.float32)
    for side, sign in enumerate((-1.0, 1.0)):
        position = np.interp(offsets + sign * distance_mm, offsets, indices)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, offsets.size - 1)
        weight = (position - low).astype(np.float32)[:, None, None]
        neighbours[:, side] = normalized[low] * (1 - weight) + normalized[high] * weight
    return neighbours


def input_channels(gradient_channels: bool, neighbours: bool) -> int:
    """How many channels ``model_input`` stacks: the slice, its two Sobel gradients, its two
    neighbours."""
    return 1 + 2 * gradient_channels + 2 * neighbours


def model_input(
    normalized: np.ndarray, gradient_channels: bool, neighbours: np.ndarray | None = None
) -> np.ndarray:
    """Stack a normalised volume (S, H, W) into network input (S, C, H, W) float32.

    Channel 0 is the slice; with ``gradient_channels`` channels 1 and 2 are its Sobel
    gradients along x (columns) and y (rows), times SOBEL_SCALE, computed within each slice;
    with ``neighbours`` (S, 2, H, W, from ``neighbour_slices``) the last two channels are
    the slices below and above.
    """
    slices = normalized.astype(np.float32, copy=False)
    count = input_channels(gradient_channels, neighbours is not None)
    channels = np.empty((slices.shape[0], count, *slices.shape[1:]), dtype=np.float32)
    channels[:, 0] = slices
    if gradient_channels:
        # Slice by slice: on the whole volume, sobel would also smooth across slices.
        for index, image in enumerate(slices):
            channels[index, 1] = ndimage.sobel(image, axis=1) * SOBEL_SCALE
            channels[index, 2] = ndimage.sobel(image, axis=0) * SOBEL_SCALE
    if neighbours is not None:
        channels[:, -2:] = neighbours
    return channels


def to_stored_pixels(output: np.ndarray) -> StoredPixels:
    """Map network output (S, H, W), in a normalised space, to 12-bit stored pixel values.

    Values outside [0, OUTPUT_CEILING] are clipped. The window spans the foreground's 0.5th..99.5th
    percentiles, so the viewer opens the tissue with full contrast and the background black.
    Raises ValueError for NaN or infinite output, the sign of a broken model.
    """
    if not np.isfinite(output).all():
        raise ValueError("the network's output contains NaN or infinite values")
    scaled = np.clip(output, 0.0, OUTPUT_CEILING) * (STORED_MAX / OUTPUT_CEILING)
    pixels = np.rint(scaled).astype(np.uint16)
    foreground = pixels[pixels > foreground_threshold(pixels)]
    if foreground.size == 0:
        return StoredPixels(pixels, BITS_STORED, (STORED_MAX + 1) / 2, float(STORED_MAX + 1))
    low, high = np.percentile(foreground, [LOW_PERCENTILE, HIGH_PERCENTILE])
    return StoredPixels(
        pixels=pixels,
        bits_stored=BITS_STORED,
        window_center=float((low + high) / 2),
        window_width=float(max(high - low, 1.0)),
    )
