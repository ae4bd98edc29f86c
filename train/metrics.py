"""Image-quality metrics of the paper, SSIM, the trivial floors and the collapse check.

The paper (Anklesaria et al., section 4) min-max normalises every slice and reports MSE,
MAE and PSNR with MAX_I = 1 (its equations 1-3). Here each of them, and SSIM (Wang et al.
2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1), is computed per
slice over two regions, the whole slice and the head, then averaged over slices. Floors are
what a model must beat to be worth anything: the input itself, and the input with its
intensities inverted inside the head (T1 and T2 roughly invert each other's tissue order).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

METRICS = ("mse", "mae", "psnr", "ssim")
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
    return values


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
