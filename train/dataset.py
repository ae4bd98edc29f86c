"""Training data: paired volumes normalised as inference will see them, sampled as crops.

The source is normalised over its whole series, exactly as ``pipeline.inference`` does
before it runs the network, and only then are the usable slices picked; the target is
normalised over its whole series too, with the normalisation the model's output is in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.preprocess import model_input, normalize_volume
from train.augment import AugmentSettings, crop_pair
from train.pairs import PairedVolume


@dataclass(frozen=True, eq=False)
class TrainingStudy:
    label: str
    patient: str
    source: np.ndarray  # float32 (K, H, W) normalised source, usable slices only
    target: np.ndarray  # float32 (K, H, W) normalised target on the source grid
    covered: np.ndarray  # bool (K, H, W): where the target is defined (the loss counts)
    head: np.ndarray  # bool (K, H, W)


def prepare_study(
    paired: PairedVolume, normalization: str, target_normalization: str | None = None
) -> TrainingStudy:
    """The usable slices of ``paired``: the source normalised with ``normalization``, the
    target with ``target_normalization`` (None: the same)."""
    source = normalize_volume(paired.source.pixels, normalization)
    target = normalize_volume(paired.target, target_normalization or normalization)
    keep = paired.slices
    return TrainingStudy(
        label=paired.pair.label,
        patient=paired.pair.patient,
        source=source[keep],
        target=target[keep],
        covered=paired.covered[keep],
        head=paired.head[keep],
    )


def sample_batch(
    studies: list[TrainingStudy],
    batch_size: int,
    crop: int,
    gradient_channels: bool,
    augment: AugmentSettings | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs (N, C, crop, crop), targets (N, 1, ...), loss weights (N, 1, ...)), float32.

    Studies are drawn with equal probability whatever their slice count, so the one thick
    native study (26 slices, with skull) weighs as much as a 155-slice atlas study: it is
    the one that looks like what a hospital sends. Crops are centred on a random head pixel.
    Sobel channels are computed after augmentation, from the image the network sees.
    """
    sources, targets, weights = [], [], []
    for _ in range(batch_size):
        study = studies[rng.integers(len(studies))]
        index = rng.integers(study.source.shape[0])
        rows, columns = np.nonzero(study.head[index] & study.covered[index])
        pick = rng.integers(rows.size)
        source, target, weight = crop_pair(
            study.source[index],
            study.target[index],
            study.covered[index],
            (int(rows[pick]), int(columns[pick])),
            crop,
            augment,
            rng,
        )
        sources.append(source)
        targets.append(target)
        weights.append(weight)
    inputs = model_input(np.stack(sources), gradient_channels)
    return inputs, np.stack(targets)[:, None], np.stack(weights)[:, None]
