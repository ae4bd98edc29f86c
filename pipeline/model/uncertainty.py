"""How unsure a synthesis is, from its Monte-Carlo dropout spread.

The network has dropout between the convolutions of every block (the paper's design). Run
with dropout on, each pass samples a slightly different network; where the passes disagree
the model is unsure (Gal and Ghahramani 2016). ``Synthesizer.synthesize_with_spread`` gives
the per-voxel spread; here it becomes one number per series, which status shows and a
route may hold a series back by. ``python -m train.uncertainty`` measures how well both
rank real errors on held-out patients (docs/uncertainty.md).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.files import write_atomically

# The per-voxel spread, kept in the job's folder beside the synthetic series (not sent:
# only .dcm files are).
SPREAD_FILE = "uncertainty.npy"


def series_uncertainty(output: np.ndarray, spread: np.ndarray, head: np.ndarray) -> float:
    """The mean spread inside the head relative to the mean output there: unitless, 0 for
    passes that agree; comparable across series whatever their brightness."""
    if not head.any():
        return 0.0
    signal = float(np.mean(np.abs(output[head])))
    return float(np.mean(spread[head])) / signal if signal > 0 else 0.0


def confidence(uncertainty: float) -> float:
    """1 - uncertainty, within [0, 1]: what status shows beside it."""
    return min(1.0, max(0.0, 1.0 - uncertainty))


def save_spread(path: Path, spread: np.ndarray) -> None:
    """Keep a spread map (S, H, W) with its job, as float16 .npy (half the bytes)."""
    buffer = io.BytesIO()
    np.save(buffer, spread.astype(np.float16))
    write_atomically(path, buffer.getvalue())
