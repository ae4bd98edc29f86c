"""The trivial floors, the collapse check and lesion fidelity, beside the image scores.

The paper's scores, SSIM and the correlation, per slice and region, are
``pipeline.model.scores`` (the node's quality monitor computes them too). Floors are what a
model must beat to be worth anything: the input itself, and the input with its intensities
inverted inside the head (T1 and T2 roughly invert each other's tissue order).

Lesion visibility is the probability that a lesion voxel is brighter than a voxel of the
tissue around it (the area under the ROC curve of intensity as a lesion detector); a
lesion's fidelity compares that probability in the synthetic image with the real one's, so
a synthetic image that paints normal tissue over a lesion scores 0 however good its PSNR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

# A model is collapsed when its output inside the head varies less than this fraction of
# the real target's variation (a near-constant image), or less than COLLAPSE_MIN_STD in
# absolute terms where there is no target to compare with. Trained models here reach 0.6
# to 1.0; the collapsed ones the architecture notes describe are below 0.05.
COLLAPSE_MIN_RATIO = 0.25
COLLAPSE_MIN_STD = 0.02


def floors(source: np.ndarray, head: np.ndarray) -> dict[str, np.ndarray]:
    """The trivial predictions for a min-max normalised source stack: itself, and inverted.

    The inversion is 1 - x inside the head with the background left at 0: inverting the
    background too would make the floor needlessly easy to beat on the whole slice.
    """
    return {"input": source, "inverted": np.where(head, 1.0 - source, 0.0)}


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
