"""Training data: paired volumes normalised as inference will see them, sampled as crops.

The source is normalised over its whole series, exactly as ``pipeline.model.inference`` does
before it runs the network, and only then are the usable slices picked, with the
neighbouring slices a 2.5-D model sees; the target is normalised over its whole series
too, with the normalisation the model's output is in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from pipeline.dicom.contrast import Contrast
from pipeline.model.preprocess import model_input, neighbour_slices, normalize_volume
from train.augment import AugmentSettings, augment_intensity, crop_pair
from train.lesionpaint import FluidLevels, PaintSettings, fluid_levels, paint_lesions
from train.pairs import PairedVolume

if TYPE_CHECKING:
    from train.trainer import TrainSettings

# A thick-slab acquisition, as most clinical 2D protocols have (3-6 mm), simulated on a
# series with thin slices: both images smoothed along the slice normal by a Gaussian of
# this full width at half maximum. Series with slices farther apart than THIN_SLICES_MM are
# thick already.
THICK_SLAB_MM = 5.0
THIN_SLICES_MM = 2.0
FWHM_PER_SIGMA = 2.3548


@dataclass(frozen=True, eq=False)
class SliceStack:
    """One rendering of a study's usable slices."""

    source: np.ndarray  # float32 (K, C, H, W): the normalised slice, then its neighbours
    target: np.ndarray  # float32 (K, H, W) normalised target on the source grid


@dataclass(frozen=True, eq=False)
class TrainingStudy:
    label: str
    patient: str
    sharp: SliceStack  # the study as acquired
    thick: SliceStack | None  # the same as a thick-slab acquisition (thin-slice studies)
    covered: np.ndarray  # bool (K, H, W): where the target is defined (the loss counts)
    head: np.ndarray  # bool (K, H, W)
    # (N, 3) slice, row, column of every voxel of an expert's lesion mask where the target
    # is defined; empty without a mask.
    lesion_voxels: np.ndarray
    levels: FluidLevels
    source_is_t1: bool

    @property
    def source(self) -> np.ndarray:
        return self.sharp.source

    @property
    def target(self) -> np.ndarray:
        return self.sharp.target


def prepare_study(paired: PairedVolume, settings: TrainSettings) -> TrainingStudy:
    """The usable slices of ``paired`` as ``settings`` train on them."""
    keep = paired.slices
    offsets = paired.source.slice_offsets

    def render(source: np.ndarray, target: np.ndarray) -> SliceStack:
        normalized = normalize_volume(source, settings.normalization)
        channels = [normalized[keep][:, None]]
        if settings.neighbour_distance_mm:
            neighbours = neighbour_slices(normalized, offsets, settings.neighbour_distance_mm)
            channels.append(neighbours[keep])
        return SliceStack(
            source=np.ascontiguousarray(np.concatenate(channels, axis=1)),
            target=normalize_volume(target, settings.output_normalization)[keep],
        )

    sharp = render(np.asarray(paired.source.pixels), paired.target)
    thick = None
    spacing = paired.source.slice_spacing
    if settings.thick_slices > 0 and spacing < THIN_SLICES_MM:
        sigma = (THICK_SLAB_MM / FWHM_PER_SIGMA / spacing, 0.0, 0.0)
        thick = render(
            ndimage.gaussian_filter(np.asarray(paired.source.pixels), sigma),
            ndimage.gaussian_filter(paired.target, sigma),
        )
    source_is_t1 = settings.direction.source is Contrast.T1
    head = paired.head[keep]
    covered = paired.covered[keep]
    lesions = paired.lesions[keep] & covered if paired.lesions is not None else None
    return TrainingStudy(
        label=paired.pair.label,
        patient=paired.pair.patient,
        sharp=sharp,
        thick=thick,
        covered=covered,
        head=head,
        lesion_voxels=np.argwhere(lesions) if lesions is not None else np.empty((0, 3), int),
        levels=fluid_levels(sharp.source[:, 0], sharp.target, head, source_is_t1),
        source_is_t1=source_is_t1,
    )


def network_input(stack: np.ndarray, gradient_channels: bool) -> np.ndarray:
    """Network input (N, C', H, W) of source stacks (N, C, H, W) from ``SliceStack``."""
    neighbours = stack[:, 1:] if stack.shape[1] > 1 else None
    return model_input(stack[:, 0], gradient_channels, neighbours)


def sample_batch(
    studies: list[TrainingStudy],
    settings: TrainSettings,
    augment: AugmentSettings | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs (N, C, crop, crop), targets (N, 1, ...), loss weights (N, 1, ...)), float32.

    Studies are drawn with equal probability whatever their slice count, so a thick
    native study (26 slices, with skull) weighs as much as a 155-slice atlas study: it is
    the kind a hospital sends. Crops are centred on a random head pixel, or with
    ``settings.lesion_oversampling`` on a voxel of an expert's lesion mask where the study
    has one. With augmentation, thin-slice studies are shown as thick slabs with
    probability ``settings.thick_slices`` and lesions are painted in with probability
    ``settings.lesion_painting``; painted pixels weigh ``1 + settings.lesion_weight``.
    Sobel channels are computed after augmentation, from the image the network sees.
    """
    distance = settings.neighbour_distance_mm
    depths = (0.0, -distance, distance) if distance else (0.0,)
    sources, targets, weights = [], [], []
    for _ in range(settings.batch_size):
        study = studies[rng.integers(len(studies))]
        index, center = _pick_center(study, settings.lesion_oversampling, rng)
        stack = study.sharp
        thick = augment is not None and study.thick is not None
        if thick and rng.random() < settings.thick_slices:
            stack = study.thick
        crop = crop_pair(
            stack.source[index],
            stack.target[index],
            study.covered[index],
            study.head[index],
            center,
            settings.crop,
            augment,
            rng,
        )
        source, target, weight = crop.source, crop.target, crop.weight
        if augment is not None:
            if settings.lesion_painting and rng.random() < settings.lesion_painting:
                source, target, painted = paint_lesions(
                    source,
                    target,
                    crop.head,
                    study.levels,
                    study.source_is_t1,
                    depths,
                    settings.pixel_spacing_mm,
                    rng,
                    PaintSettings(
                        single_probability=settings.painted_tumour_share,
                        t1_share=settings.painted_t1_share,
                    ),
                )
                weight = weight * (1 + settings.lesion_weight * (painted > 0))
            source = augment_intensity(source, augment, rng)
        sources.append(source)
        targets.append(target)
        weights.append(weight)
    inputs = network_input(np.stack(sources), settings.gradient_channels)
    return inputs, np.stack(targets)[:, None], np.stack(weights)[:, None].astype(np.float32)


def _pick_center(
    study: TrainingStudy, lesion_oversampling: float, rng: np.random.Generator
) -> tuple[int, tuple[int, int]]:
    if len(study.lesion_voxels) and rng.random() < lesion_oversampling:
        index, row, column = study.lesion_voxels[rng.integers(len(study.lesion_voxels))]
        return int(index), (int(row), int(column))
    index = int(rng.integers(study.source.shape[0]))
    rows, columns = np.nonzero(study.head[index] & study.covered[index])
    pick = rng.integers(rows.size)
    return index, (int(rows[pick]), int(columns[pick]))
