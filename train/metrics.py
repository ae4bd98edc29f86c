"""Image-quality metrics of the paper, SSIM, the trivial floors and the collapse check.

The paper (Anklesaria et al., section 4) min-max normalises every slice and reports MSE,
MAE and PSNR with MAX_I = 1 (its equations 1-3). Here each of them, and SSIM (Wang et al.
2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1), is computed per
slice over two regions, the whole slice and the head, then averaged over slices. Floors are
what a model must beat to be worth anything: the input itself, and the input with its
intensities inverted inside the head (T1 and T2 roughly invert each other's tissue order).

Two scores stand beside the paper's. The correlation inside the head is scale-free, so the
different grey levels of sites and of normalisations do not move it. Lesion visibility is
the probability that a lesion voxel is brighter than a voxel of the tissue around it (the
area under the ROC curve of intensity as a lesion detector); a lesion's fidelity compares
that probability in the synthetic image with the real one's, so a synthetic image that
paints normal tissue over a lesion scores 0 however good its PSNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

METRICS = ("mse", "mae", "psnr", "ssim", "corr")
REGIONS = ("slice", "head")
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 11x11 window at sigma 1.5, as Wang et al.
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
# A slice reproduced exactly would have infinite PSNR; this caps it (100 dB at MSE 1e-10).
MSE_FLOOR = 1e-10

# A model is collapsed when its output inside the head varies less than this fraction of
# the real target's variation (a near-constant image), or less than COLLAPSE_MIN_STD in
# absolute terms where there is no target to compare with. Trained models here reach 0.6
# to 1.0; the collapsed ones the architecture notes describe are below 0.05.
COLLAPSE_MIN_RATIO = 0.25
COLLAPSE_MIN_STD = 0.02


def minmax_slices(volume: np.ndarray) -> np.ndarray:
    """Each slice of (S, H, W) scaled to [0, 1] by its own min and max (a flat slice -> 0)."""
    volume = volume.astype(np.float64)
    low = volume.min(axis=(1, 2), keepdims=True)
    span = volume.max(axis=(1, 2), keepdims=True) - low
    return np.divide(volume - low, span, out=np.zeros_like(volume), where=span > 0)


def ssim_map(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Local SSIM of two images in [0, 1], one value per pixel."""

    def blur(image: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(image, SSIM_SIGMA, truncate=SSIM_TRUNCATE)

    mean_a, mean_b = blur(first), blur(second)
    var_a = blur(first * first) - mean_a**2
    var_b = blur(second * second) - mean_b**2
    covariance = blur(first * second) - mean_a * mean_b
    numerator = (2 * mean_a * mean_b + SSIM_C1) * (2 * covariance + SSIM_C2)
    denominator = (mean_a**2 + mean_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return numerator / denominator


def slice_metrics(
    prediction: np.ndarray, real: np.ndarray, valid: np.ndarray, head: np.ndarray
) -> dict[str, list[float]]:
    """Per-slice metrics of two (S, H, W) stacks already min-max normalised per slice.

    ``valid`` marks the pixels that count as "the slice" (all, unless the real image was
    resampled and does not cover every pixel), ``head`` those inside the head. Returns
    ``{"mse_slice": [...], "psnr_head": [...], ...}``, one value per slice.
    """
    values: dict[str, list[float]] = {f"{m}_{r}": [] for m in METRICS for r in REGIONS}
    for a, b, where_valid, where_head in zip(prediction, real, valid, head, strict=True):
        similarity = ssim_map(a, b)
        for region, where in (("slice", where_valid), ("head", where_head & where_valid)):
            error = a[where] - b[where]
            mse = float(np.mean(error**2))
            values[f"mse_{region}"].append(mse)
            values[f"mae_{region}"].append(float(np.mean(np.abs(error))))
            values[f"psnr_{region}"].append(10 * math.log10(1.0 / max(mse, MSE_FLOOR)))
            values[f"ssim_{region}"].append(float(np.mean(similarity[where])))
            values[f"corr_{region}"].append(correlation(a[where], b[where]))
    return values


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson's correlation of two samples; 0 where either is constant (no information)."""
    a = first - first.mean()
    b = second - second.mean()
    norm = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / norm if norm > 0 else 0.0


def floors(source: np.ndarray, head: np.ndarray) -> dict[str, np.ndarray]:
    """The trivial predictions for a min-max normalised source stack: itself, and inverted.

    The inversion is 1 - x inside the head with the background left at 0: inverting the
    background too would make the floor needlessly easy to beat on the whole slice.
    """
    return {"input": source, "inverted": np.where(head, 1.0 - source, 0.0)}


def mean_metrics(values: dict[str, list[float]]) -> dict[str, float]:
    return {key: float(np.mean(items)) for key, items in values.items() if items}


def collapse_check(
    output: np.ndarray, head: np.ndarray, real: np.ndarray | None = None
) -> dict[str, float | bool]:
    """How much a model's raw output varies inside the head, and whether that is a collapse.

    ``spread`` is the mean over slices of the output's standard deviation inside the head;
    with ``real`` (the target in the same normalised space) it is also given relative to the
    target's own spread.
    """
    spread = _mean_spread(output, head)
    result: dict[str, float | bool] = {"spread": spread}
    collapsed = spread < COLLAPSE_MIN_STD
    if real is not None:
        reference = _mean_spread(real, head)
        ratio = spread / reference if reference > 0 else 0.0
        result.update(reference_spread=reference, ratio=ratio)
        collapsed = collapsed or ratio < COLLAPSE_MIN_RATIO
    result["collapsed"] = bool(collapsed)
    return result


def _mean_spread(volume: np.ndarray, mask: np.ndarray) -> float:
    spreads = [
        float(np.std(image[where]))
        for image, where in zip(volume, mask, strict=True)
        if where.any()
    ]
    return float(np.mean(spreads)) if spreads else 0.0


# The surroundings a lesion is compared with: beyond its partial-volume edge, within a few
# millimetres (about the width of the white matter it usually sits in).
SURROUND_GAP_MM = 1.0
SURROUND_MM = 5.0
# Below this distance of the real image's lesion visibility from chance (0.5), the real
# lesion is too faint to measure a fidelity against: the ratio would amplify noise.
MIN_VISIBILITY = 0.05


def brighter_probability(image: np.ndarray, lesion: np.ndarray, reference: np.ndarray) -> float:
    """The probability that a voxel of ``lesion`` is brighter than one of ``reference``
    (ties count half): the Mann-Whitney U statistic over the product of the two counts,
    i.e. the area under the ROC curve of ``image``'s intensity as a lesion detector.

    Invariant to any increasing map of the intensities, so images in different spaces
    (stored pixels, a normalised target) compare directly. Raises ValueError for an empty
    ``lesion`` or ``reference``.
    """
    inside, outside = image[lesion].ravel(), image[reference].ravel()
    if not inside.size or not outside.size:
        raise ValueError("lesion visibility needs voxels both inside and outside the lesion")
    ranks = stats.rankdata(np.concatenate([inside, outside]))
    u = float(ranks[: inside.size].sum()) - inside.size * (inside.size + 1) / 2
    return u / (inside.size * outside.size)


@dataclass(frozen=True)
class LesionFidelity:
    """How visible a lesion is in a synthetic image against the real one.

    ``fidelity`` = (synthetic - 0.5) / (real - 0.5) of the two brighter-probabilities:
    1 as visible as in reality, 0 vanished, negative inverted; None where the real lesion
    is within MIN_VISIBILITY of chance. Works for both directions: a T1-dark lesion has a
    real probability below 0.5 and a faithful synthetic T1 one below 0.5 too.
    """

    real: float
    synthetic: float
    voxels: int

    @property
    def fidelity(self) -> float | None:
        if abs(self.real - 0.5) < MIN_VISIBILITY:
            return None
        return (self.synthetic - 0.5) / (self.real - 0.5)


def lesion_surroundings(
    lesion: np.ndarray, region: np.ndarray, spacing: tuple[float, float, float]
) -> np.ndarray:
    """The voxels of ``region`` around ``lesion`` (S, H, W) that a reader compares it with:
    farther than SURROUND_GAP_MM (the lesion's blurred edge) and within SURROUND_MM.

    The tissue around a lesion, not the whole brain: an MS lesion on T1 is darker than the
    white matter it sits in but brighter than CSF, so against the whole brain it is
    invisible (a probability near 0.5) where a radiologist sees it at once.
    ``spacing`` is (between slices, between rows, between columns) in mm.
    """
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    return region & ~lesion & (distance > SURROUND_GAP_MM) & (distance <= SURROUND_MM)


def lesion_fidelity(
    synthetic: np.ndarray,
    real: np.ndarray,
    lesion: np.ndarray,
    region: np.ndarray,
    spacing: tuple[float, float, float],
) -> LesionFidelity:
    """Lesion visibility of ``synthetic`` and ``real`` (same grid): lesion voxels within
    ``region`` (the head where the real image is defined) against their surroundings."""
    inside = lesion & region
    around = lesion_surroundings(inside, region, spacing)
    return LesionFidelity(
        real=brighter_probability(real, inside, around),
        synthetic=brighter_probability(synthetic, inside, around),
        voxels=int(inside.sum()),
    )
