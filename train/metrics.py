"""The trivial floors, the collapse check and lesion fidelity, beside the image scores.

The paper's scores, SSIM and the correlation, per slice and region, are
``pipeline.model.scores`` (the node's quality monitor computes them too). Floors are what a
model must beat to be worth anything: the input itself, and the input with its intensities
inverted inside the head (T1 and T2 roughly invert each other's tissue order).

Lesion visibility is the probability that a lesion voxel is brighter than a voxel of the
tissue around it (the area under the ROC curve of intensity as a lesion detector); a
lesion's fidelity compares that probability in the synthetic image with the real one's, so
a synthetic image that paints normal tissue over a lesion scores 0 however good its PSNR.
Its mirror, spurious foci, counts lesion-like foci that the synthetic image shows and the
real one does not, on every study, with a mask or without.
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


# A focus is a voxel that stands out from the tissue within about BACKGROUND_SIGMA_MM by
# FOCUS_CONTRAST in rank (a jump of 30 percentiles of the region's intensities; the shared
# MS lesions stand out from their surroundings by about 0.2 on their real T2, a bright
# glioma by more), grouped into connected foci of at least MIN_FOCUS_MM3 (a 3.4 mm ball,
# the smallest lesion a reader counts).
BACKGROUND_SIGMA_MM = 4.0
FOCUS_CONTRAST = 0.3
MIN_FOCUS_MM3 = 20.0


@dataclass(frozen=True)
class Focus:
    """One lesion-like focus: ``peak`` is its voxel that stands out most (slice, row, column
    of the scored volume), by ``contrast`` in rank; ``volume_mm3`` is the part of it that
    stands out by more than FOCUS_CONTRAST."""

    peak: tuple[int, int, int]
    volume_mm3: float
    contrast: float


@dataclass(frozen=True)
class SpuriousFoci:
    """Lesion-like foci of a synthetic image that the real image does not show.

    ``count`` foci of ``volume_ml`` in all (the part of each that stands out: a focus much
    wider than BACKGROUND_SIGMA_MM counts by its core), within a region of ``region_ml``.
    They count every cause of a focus the real image lacks: a hallucinated lesion, but also
    a sulcus or vessel drawn a few millimetres off, so the number is read against the
    floors and against a model trained without painted lesions, on the same studies, not
    as a count of hallucinations.
    """

    count: int
    volume_ml: float
    region_ml: float


def _quantiles(values: np.ndarray) -> np.ndarray:
    """Each value's rank among ``values`` scaled to [0, 1], ties sharing their mean rank
    (stored pixels repeat: an arbitrary order among equals would be texture that is not
    there)."""
    if values.size < 2:
        return np.zeros(values.shape, dtype=np.float32)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts + 1) / 2
    return (mean_rank[inverse] / (values.size - 1)).astype(np.float32)


class SpuriousFociScorer:
    """Spurious foci of predictions against one real image: foci of a prediction (contrast
    above FOCUS_CONTRAST, ``bright`` or dark as the target contrast shows its lesions) where
    ``real`` (same grid) stands out by less than half as much, outside ``known`` lesions and
    their partial-volume edge. ``spacing`` is (between slices, between rows, between
    columns) in mm. The real image's side is computed once for all predictions."""

    def __init__(
        self,
        real: np.ndarray,
        region: np.ndarray,
        spacing: tuple[float, float, float],
        *,
        bright: bool = True,
        known: np.ndarray | None = None,
    ) -> None:
        self.region, self.spacing = region, spacing
        self.voxel_mm3 = float(np.prod(spacing))
        self.sigma = [BACKGROUND_SIGMA_MM / step for step in spacing]
        # How much of each voxel's surroundings is region: the same for every image.
        self.weight = np.maximum(
            ndimage.gaussian_filter(region.astype(np.float32), self.sigma), 1e-6
        )
        self.sign = 1.0 if bright else -1.0
        real_contrast = self.local_contrast(self.sign * real)
        # Where the real image shows no focus, away from the lesions an expert marked.
        self.quiet = region & (real_contrast < FOCUS_CONTRAST / 2)
        if known is not None:
            distance = ndimage.distance_transform_edt(~known, sampling=spacing)
            self.quiet &= distance > SURROUND_GAP_MM

    def local_contrast(self, image: np.ndarray) -> np.ndarray:
        """How far each voxel of the region ranks above the tissue around it: its quantile
        among the region's intensities minus the Gaussian-weighted mean quantile of the
        region within about BACKGROUND_SIGMA_MM (0 outside the region). Ranks, so any
        increasing map of the intensities (another site's scale) gives the same contrast."""
        quantile = np.zeros(image.shape, dtype=np.float32)
        quantile[self.region] = _quantiles(image[self.region])
        around = ndimage.gaussian_filter(quantile, self.sigma) / self.weight
        return np.where(self.region, quantile - around, 0.0)

    def __call__(self, prediction: np.ndarray) -> SpuriousFoci:
        return self.summarize(self.foci(prediction))

    def foci(self, prediction: np.ndarray) -> list[Focus]:
        """The prediction's spurious foci, largest first."""
        contrast = self.local_contrast(self.sign * prediction)
        labels, count = ndimage.label(
            self.quiet & (contrast > FOCUS_CONTRAST), structure=np.ones((3, 3, 3))
        )
        sizes = np.bincount(labels.ravel(), minlength=count + 1) * self.voxel_mm3
        kept = np.flatnonzero(sizes[1:] >= MIN_FOCUS_MM3) + 1
        if not kept.size:
            return []
        peaks = ndimage.maximum_position(contrast, labels, kept)
        foci = [
            Focus(
                peak=tuple(int(i) for i in peak),
                volume_mm3=float(sizes[label]),
                contrast=float(contrast[peak]),
            )
            for label, peak in zip(kept, peaks, strict=True)
        ]
        return sorted(foci, key=lambda focus: -focus.volume_mm3)

    def summarize(self, foci: list[Focus]) -> SpuriousFoci:
        return SpuriousFoci(
            count=len(foci),
            volume_ml=sum(focus.volume_mm3 for focus in foci) / 1000,
            region_ml=float(self.region.sum()) * self.voxel_mm3 / 1000,
        )
