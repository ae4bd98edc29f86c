"""How close a synthetic image is to the real one: the paper's scores, SSIM and correlation.

The paper (Anklesaria et al., section 4) min-max normalises every slice and reports MSE,
MAE and PSNR with MAX_I = 1 (its equations 1-3). Here each of them, SSIM (Wang et al.
2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1) and Pearson's
correlation are computed per slice over two regions, the whole slice and the head.

The node's quality monitor (``pipeline.quality``) scores every synthesis whose real
counterpart arrives with these, and training and evaluation (``train.metrics``,
``train.evaluate``) score held-out patients with the same functions, so a score means the
same on a model card and in the monitor. Torch-free: the monitor runs in the node's
scheduler, which must not load torch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.dicom.registration import Placement, place_onto
from pipeline.dicom.volume import Volume
from pipeline.model.preprocess import foreground_threshold, head_mask

METRICS = ("mse", "mae", "psnr", "ssim", "corr")
REGIONS = ("slice", "head")
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 11x11 window at sigma 1.5, as Wang et al.
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
# A slice reproduced exactly would have infinite PSNR; this caps it (100 dB at MSE 1e-10).
MSE_FLOOR = 1e-10

# A source slice whose head covers less than this fraction of it is a tip of the skull or
# empty background: nothing a contrast mapping can learn from or be judged on.
MIN_HEAD_FRACTION = 0.02
# Fraction of a source slice's head that the target must cover after resampling; below it
# the slice lies (partly) outside the target's slab and its pair would be half empty.
MIN_COVERAGE = 0.95


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


def correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson's correlation of two samples; 0 where either is constant (no information)."""
    a = first - first.mean()
    b = second - second.mean()
    norm = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / norm if norm > 0 else 0.0


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


def mean_metrics(values: dict[str, list[float]]) -> dict[str, float]:
    return {key: float(np.mean(items)) for key, items in values.items() if items}


def usable_slices(
    head: np.ndarray, covered: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, dict[str, int]]:
    """The slices of a source (its ``head`` mask, S x H x W) whose resampled ``target``
    (defined where ``covered``) makes a pair worth scoring or learning from, ascending, and
    how many were dropped for which reason."""
    reasons: Counter[str] = Counter()
    keep = []
    pixels_per_slice = head[0].size
    target_head = target > foreground_threshold(target[covered]) if covered.any() else covered
    for index in range(head.shape[0]):
        area = int(head[index].sum())
        if area < MIN_HEAD_FRACTION * pixels_per_slice:
            reasons["with (almost) no head in the source"] += 1
        elif covered[index][head[index]].mean() < MIN_COVERAGE:
            reasons["outside the target's slab (no overlap)"] += 1
        elif target_head[index].sum() < MIN_HEAD_FRACTION * pixels_per_slice:
            reasons["with (almost) no head in the target"] += 1
        else:
            keep.append(index)
    return np.array(keep, dtype=int), dict(reasons)


@dataclass(frozen=True, eq=False)
class RealOnSource:
    """The real series of the target contrast placed on a source series' grid."""

    head: np.ndarray  # bool (S, H, W): the head in the source, holes filled
    placement: Placement  # the real series' intensities on the source's grid, and where
    slices: np.ndarray  # the source slices that pair up with it, ascending
    dropped: dict[str, int]  # reason -> number of source slices left out


def place_real(source: Volume, real: Volume, register: bool = True) -> RealOnSource:
    """``real`` placed on ``source``'s grid (``place_onto``) and the usable slice pairs:
    what a held-out evaluation and the node's quality monitor both score on."""
    head = head_mask(source.pixels)
    placement = place_onto(real, source, head, head_mask(real.pixels), register)
    slices, dropped = usable_slices(head, placement.covered, placement.resampled)
    return RealOnSource(head, placement, slices, dropped)
