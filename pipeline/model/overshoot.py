"""Output brighter than anything the model learnt to draw: the sign of an artefact.

A model learns to map into its target's normalised range, [0, top]. On the shared studies
the shipped models peak at 0.96-1.19 times the top, and the k-fold models on their
held-out studies at 0.95-1.31 where their images are sound (one 1.51, over 0.009 mL);
those that drew a dotted line along the scalp of a study as acquired reached 1.8-2.2
times it over 0.7-3 mL (docs/ablation.md, "Output beyond the learnt range"). What lies
above OVERSHOOT_FACTOR times the top is extrapolation, not a tissue the model has seen;
the node holds a series with more of it than ``[output] hold_overshoot_above_ml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.model.preprocess import Normalization, normalized_ceiling

OVERSHOOT_FACTOR = 1.5


@dataclass(frozen=True)
class Overshoot:
    volume_ml: float  # of the voxels above OVERSHOOT_FACTOR times the learnt top
    peak: float  # the brightest output, in units of the learnt top
    peak_slice: int  # the index of the slice it is in


def measure_overshoot(
    output: np.ndarray, normalization: Normalization, voxel_mm3: float
) -> Overshoot:
    """How much of ``output`` (slices, H, W), in the target space of ``normalization``,
    lies beyond the range the model learnt."""
    top = normalized_ceiling(normalization)
    beyond = int(np.count_nonzero(output > OVERSHOOT_FACTOR * top))
    brightest = np.unravel_index(int(np.argmax(output)), output.shape)
    return Overshoot(
        volume_ml=beyond * voxel_mm3 / 1000,
        peak=float(output[brightest]) / top,
        peak_slice=int(brightest[0]),
    )
