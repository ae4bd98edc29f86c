"""Figures like the paper's: input, synthetic, real and their difference, a few slices per row.

Each image is shown with its own per-slice min-max window (the space the metrics use), so a
synthetic slice that is too bright or too flat looks it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from pipeline.model.scores import minmax_slices

FIGURE_SLICES = 4


def pick_slices(count: int, wanted: int = FIGURE_SLICES) -> list[int]:
    """Evenly spread slice indices, avoiding the first and last fifth (tips of the head)."""
    if count <= wanted:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0.2 * (count - 1), 0.8 * (count - 1), wanted)})


# Draws on a panel after its image: (axis, the picked slice's index).
Overlay = Callable[[Axes, int], None]


def save_grid(
    path: Path,
    title: str,
    picks: list[int],
    panels: dict[str, np.ndarray],
    overlays: dict[str, Overlay] | None = None,
    size: float = 2.4,
) -> Path:
    """Write a PNG: one row per picked slice, one column per panel (each (len(picks), H, W)
    in [0, 1]), with an optional overlay drawn on each panel of a column."""
    rows, columns = len(picks), len(panels)
    figure, axes = plt.subplots(
        rows, columns, figsize=(size * columns, size * rows + 0.4), squeeze=False
    )
    for row, index in enumerate(picks):
        for column, (name, images) in enumerate(panels.items()):
            axis = axes[row][column]
            axis.imshow(images[row], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if overlays and name in overlays:
                overlays[name](axis, index)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
            if column == 0:
                axis.set_ylabel(f"slice {index}", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def save_comparison(
    path: Path,
    title: str,
    source: np.ndarray,
    output: np.ndarray,
    real: np.ndarray | None = None,
    focus: list[int] | None = None,
) -> Path:
    """Write a PNG: one row per picked slice (``focus``, else spread over the volume);
    input, synthetic, and with ``real``, the real target and |synthetic - real|. All
    stacks are (S, H, W) on the same grid."""
    picks = focus or pick_slices(source.shape[0])
    panels = {"input": minmax_slices(source[picks]), "synthetic": minmax_slices(output[picks])}
    if real is not None:
        panels["real"] = minmax_slices(real[picks])
        panels["|synthetic - real|"] = np.abs(panels["synthetic"] - panels["real"])
    return save_grid(path, title, picks, panels)
