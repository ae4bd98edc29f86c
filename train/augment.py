"""Augmentation of training crops for a model that has to work on other scanners and sites.

What differs between sites is mostly not anatomy but how it looks: the intensity mapping
(vendor, sequence parameters: gamma), the coil's receive field (a smooth multiplicative bias
field), noise (Rician, since MR magnitude images are), resolution (thick or blurred slices)
and small differences in head position. The source crop gets all of them; the target only
the geometry and flips, which must move both images alike.

Everything draws from the ``numpy.random.Generator`` passed in, so a seeded run is
repeatable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentSettings:
    flip: float = 0.5  # probability of a left-right flip (brains are nearly symmetric)
    rotation_degrees: float = 10.0
    scale: float = 0.1  # +- fraction
    gamma: float = 0.4  # log-uniform gamma in [exp(-g), exp(g)]
    bias_field: float = 0.3  # amplitude of the smooth log-field
    noise: float = 0.04  # largest Rician noise sigma, in normalised units
    blur: float = 1.2  # largest Gaussian blur sigma per axis, pixels
    probability: float = 0.8  # of each intensity augmentation
    ceiling: float = 1.0  # the top of the normalised range (preprocess.normalized_ceiling)


@dataclass(frozen=True)
class Crop:
    """Aligned crops of one training slice: the source's channels, the target, where the
    loss counts and where the head is."""

    source: np.ndarray  # (C, size, size)
    target: np.ndarray  # (size, size)
    weight: np.ndarray  # (size, size): 1 where the target is defined
    head: np.ndarray  # (size, size) bool


def crop_pair(
    source: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    head: np.ndarray,
    center: tuple[int, int],
    size: int,
    settings: AugmentSettings | None,
    rng: np.random.Generator,
) -> Crop:
    """A ``size`` x ``size`` crop around ``center`` of a source (C, H, W: the slice and its
    neighbours) and its target, weight and head (H, W), moved alike.

    With ``settings`` None the crop is plain, else rotated, scaled and flipped at random.
    Pixels outside the slice are 0 in all of them. The intensities are left to
    ``augment_intensity``, which runs after any lesion is painted in.
    """
    matrix = np.eye(2)
    if settings is not None:
        angle = math.radians(rng.uniform(-settings.rotation_degrees, settings.rotation_degrees))
        zoom = rng.uniform(1 - settings.scale, 1 + settings.scale)
        rotation = np.array(
            [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        )
        matrix = rotation / zoom
        if rng.random() < settings.flip:
            matrix = matrix @ np.diag([1.0, -1.0])
    half = (size - 1) / 2
    offset = np.asarray(center, dtype=float) - matrix @ np.array([half, half])

    def warp(image: np.ndarray, order: int) -> np.ndarray:
        return ndimage.affine_transform(
            image, matrix, offset, output_shape=(size, size), order=order, mode="constant"
        )

    return Crop(
        source=np.stack([warp(channel, 1) for channel in source]).astype(np.float32),
        target=warp(target, 1).astype(np.float32),
        weight=warp(weight.astype(np.float32), 0),
        head=warp(head.astype(np.float32), 0) > 0.5,
    )


def augment_intensity(
    source: np.ndarray, settings: AugmentSettings, rng: np.random.Generator
) -> np.ndarray:
    """The source crop (C, h, w) as another scanner might show it: one gamma, coil field
    and blur for all its channels (they are neighbouring slices of one series), noise of
    its own in each."""
    image = np.clip(source, 0.0, None)
    if rng.random() < settings.probability:
        gamma = math.exp(rng.uniform(-settings.gamma, settings.gamma))
        image = settings.ceiling * (image / settings.ceiling) ** gamma
    if rng.random() < settings.probability:
        image = image * _bias_field(image.shape[1:], settings.bias_field, rng)
    if rng.random() < settings.probability:
        sigmas = rng.uniform(0.0, settings.blur, size=2)
        image = ndimage.gaussian_filter(image, (0.0, *sigmas))
    if rng.random() < settings.probability:
        sigma = rng.uniform(0.0, settings.noise)
        real = image + rng.normal(0.0, sigma, image.shape)
        imaginary = rng.normal(0.0, sigma, image.shape)
        image = np.hypot(real, imaginary)
    # Inference sees inputs within [0, ceiling]: so must training.
    peak = image.max()
    image = image * (settings.ceiling / peak) if peak > settings.ceiling else image
    return image.astype(np.float32)


def _bias_field(shape: tuple[int, ...], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """exp of a random second-order polynomial over the crop: smooth, like a coil's field."""
    rows, columns = np.meshgrid(
        np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij"
    )
    terms = np.stack([rows, columns, rows * columns, rows**2, columns**2])
    coefficients = rng.uniform(-1, 1, size=(5, 1, 1))
    field = np.sum(coefficients * terms, axis=0)
    return np.exp(amplitude * field / max(np.abs(field).max(), 1e-6))
