"""How much of a lesion's visibility the source image carries: the bound that any
synthesis from that source meets, for each study with a lesion mask.

The source is described around each voxel by a few features: its intensity, that
intensity averaged over 3 and 8 mm in the slice, and how the 3 mm average differs from the
other hemisphere's at the mirror-image voxel. For each set of features, two functions
of the feature bins are fit on half of the study's slabs and applied to the other half
(and the other way round), and scored with lesion fidelity against the real target:

- regression: the mean target of each bin, what a network trained with a squared error
  tends to where these features are all it can tell apart. Where a lesion's features are
  those of normal tissue, this paints the normal tissue's mean over it;
- separability: each bin's ratio of lesion voxels to surrounding voxels, the most visible
  any function of these features can make the lesion (a likelihood ratio ranks best).

Both are fit on the study itself, so both are optimistic: a model trained on other
patients knows neither this patient's mapping nor where its lesions are. A network sees
more context than three scales; where it beats the regression it uses that context.

    .venv/bin/python -m train.ceiling ../shared/data/mr-brain ../shared/data/mr-brain-more \\
        --lesions ../shared/data/lesions var/flair-masks
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipeline.dicom.contrast import Direction
from pipeline.dicom.volume import SeriesError
from train.lesions import LesionMaskError, LesionMasks
from train.metrics import brighter_probability, lesion_fidelity, lesion_surroundings
from train.pairs import find_pairs, load_pair


@dataclass(frozen=True)
class Feature:
    """The source averaged over ``scale_mm`` in the slice (0: the voxel itself); with
    ``other_side``, that average minus the same at the mirror-image voxel across the head's
    midline: what differs from the other hemisphere, as a one-sided lesion does."""

    scale_mm: float
    other_side: bool = False


# name -> (features, bins per feature): the bins per feature shrink as features are added,
# so each bin keeps enough voxels.
FEATURE_SETS: dict[str, tuple[tuple[Feature, ...], int]] = {
    "intensity": ((Feature(0.0),), 128),
    "+3 mm": ((Feature(0.0), Feature(3.0)), 48),
    "+3, 8 mm": ((Feature(0.0), Feature(3.0), Feature(8.0)), 20),
    "+3 mm, other side": ((Feature(0.0), Feature(3.0), Feature(3.0, other_side=True)), 20),
}
# Slices per slab of the two halves: whole slabs, so that a voxel's neighbours above and
# below are mostly on its own side.
SLAB = 8


@dataclass(frozen=True)
class Ceiling:
    """Lesion fidelity of the best regression and the best ranking of one feature set."""

    regression: float | None
    separability: float | None


def lesion_ceiling(
    source: np.ndarray,
    target: np.ndarray,
    lesion: np.ndarray,
    region: np.ndarray,
    spacing: tuple[float, float, float],
) -> dict[str, Ceiling]:
    """The ceilings of FEATURE_SETS for one study (S, H, W) on one grid; ``region`` is
    where the target is defined, ``spacing`` (between slices, rows, columns) in mm."""
    source = np.where(region, source, 0.0).astype(np.float32)
    around = lesion_surroundings(lesion & region, region, spacing)
    # A ranking that puts the lesion first makes it bright; a T1 lesion is dark.
    sign = 1.0 if brighter_probability(target, lesion & region, around) >= 0.5 else -1.0
    half = (np.arange(source.shape[0]) // SLAB % 2).astype(bool)[:, None, None]
    halves = [region & ~half, region & half]
    result = {}
    for name, (features, bins) in FEATURE_SETS.items():
        key = _bin_keys([_feature(source, region, f, spacing) for f in features], region, bins)
        size = bins ** len(features)
        regression = np.zeros(source.shape, dtype=np.float64)
        ranking = np.zeros(source.shape, dtype=np.float64)
        for fit, apply in (halves, halves[::-1]):
            regression[apply] = _bin_means(key[fit], target[fit], size)[key[apply]]
            inside = np.bincount(key[fit], weights=lesion[fit], minlength=size)
            outside = np.bincount(key[fit], weights=around[fit], minlength=size)
            ranking[apply] = sign * ((inside + 0.5) / (outside + 0.5))[key[apply]]
        result[name] = Ceiling(
            regression=lesion_fidelity(regression, target, lesion, region, spacing).fidelity,
            separability=lesion_fidelity(ranking, target, lesion, region, spacing).fidelity,
        )
    return result


def _feature(
    source: np.ndarray, region: np.ndarray, feature: Feature, spacing: tuple[float, float, float]
) -> np.ndarray:
    averaged = _averaged(source, region, feature.scale_mm, spacing)
    if not feature.other_side:
        return averaged
    other = mirrored(region.astype(np.float32), region) > 0.5
    return np.where(other, averaged - mirrored(averaged, region), 0.0)


def mirrored(volume: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``volume`` (S, H, W) flipped left to right about the column of the centre of
    ``region`` (the head): each voxel gets its mirror image across the midline. Axial
    slices whose columns run from one side of the patient to the other, as every study
    here; a head turned in the slice blurs the comparison."""
    columns = region.sum(axis=(0, 1))
    centre = (columns * np.arange(columns.size)).sum() / max(columns.sum(), 1)
    shift = 2 * centre - (columns.size - 1)
    return ndimage.shift(volume[:, :, ::-1], (0, 0, shift), order=1, mode="constant")


def _averaged(
    source: np.ndarray, region: np.ndarray, scale_mm: float, spacing: tuple[float, float, float]
) -> np.ndarray:
    """The source's mean over ``scale_mm`` in the slice, over ``region`` only (the
    background would darken the edge of the brain)."""
    if not scale_mm:
        return source
    sigma = (0.0, scale_mm / spacing[1], scale_mm / spacing[2])
    weight = ndimage.gaussian_filter(region.astype(np.float32), sigma)
    return ndimage.gaussian_filter(source, sigma) / np.maximum(weight, 1e-3)


def _bin_keys(features: list[np.ndarray], region: np.ndarray, bins: int) -> np.ndarray:
    """One integer per voxel: its bin in each feature's quantiles over ``region``."""
    key = np.zeros(region.shape, dtype=np.int64)
    for feature in features:
        edges = np.quantile(feature[region], np.linspace(0, 1, bins + 1)[1:-1])
        key = key * bins + np.searchsorted(edges, feature)
    return key


def _bin_means(key: np.ndarray, target: np.ndarray, size: int) -> np.ndarray:
    """Each bin's mean target; a bin without voxels gets the overall mean."""
    counts = np.bincount(key, minlength=size)
    sums = np.bincount(key, weights=target, minlength=size)
    return (sums + target.mean()) / (counts + 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.ceiling", description=__doc__)
    parser.add_argument("data", nargs="+", type=Path, help="folders of paired studies")
    parser.add_argument(
        "--lesions", nargs="+", type=Path, required=True, help="folders of lesion masks"
    )
    directions = [direction.value for direction in Direction]
    parser.add_argument(
        "--directions", nargs="+", default=directions, choices=directions, help="(default both)"
    )
    args = parser.parse_args(argv)
    try:
        masks = LesionMasks.load(*args.lesions)
    except LesionMaskError as error:
        parser.error(str(error))
    # Only the studies with a mask on either series: the others are not worth registering.
    pairs = [
        pair
        for pair in find_pairs(args.data).pairs
        if any(masks.for_series(series.series_uid) for series in (pair.t1, pair.t2))
    ]
    names = list(FEATURE_SETS)
    for direction in args.directions:
        print(f"\n{direction}: lesion fidelity, regression / separability of the source's")
        print("| study | inverted input | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 2) + "|")
        for pair in pairs:
            try:
                item = load_pair(pair, direction, lesions=masks)
            except (SeriesError, LesionMaskError) as error:
                print(f"| {pair.label} | not read: {error} |")
                continue
            keep = item.slices
            if item.lesions is None or not item.lesions[keep].any():
                continue
            source, target = item.source.pixels[keep], item.target[keep]
            lesion, region = item.lesions[keep], item.head[keep] & item.covered[keep]
            spacing = (item.source.slice_spacing, *map(float, item.source.pixel_spacing))
            inverted = lesion_fidelity(
                np.where(region, -source, 0.0), target, lesion, region, spacing
            )
            ceilings = lesion_ceiling(source, target, lesion, region, spacing)
            cells = [
                f"{_format(c.regression)} / {_format(c.separability)}" for c in ceilings.values()
            ]
            print(f"| {pair.label} | {_format(inverted.fidelity)} | " + " | ".join(cells) + " |")
    return 0


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
