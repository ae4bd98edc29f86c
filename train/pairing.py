"""The pairing report: how training and evaluation place every T1/T2 pair, both directions.

Prints, for each pair under the data folders and each direction, the line that
``dicomnode train`` and ``dicomnode evaluate`` print (``PairedVolume.summary``: slices used
and dropped, and for series on different grids what the registration proposed, whether it
was applied and why not), with the time the registration took; optionally an overlay
figure of one pair placed by its headers and by the registration::

    .venv/bin/python -m train.pairing ../shared/data/mr-brain ../shared/data/mr-brain-more \
        --figure var/registration-ms-l03-native.png --pair ms-l03-native

docs/registration.md holds its output for the shared studies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from scipy import ndimage

from pipeline.dicom.contrast import Direction
from pipeline.dicom.volume import SeriesError
from pipeline.model.preprocess import foreground_threshold
from pipeline.model.scores import minmax_slices
from train.figures import Overlay, pick_slices, save_grid
from train.pairs import find_pairs, load_pair


def save_overlay(
    path: Path, title: str, source: np.ndarray, placements: dict[str, np.ndarray]
) -> Path:
    """Write a PNG: one row per picked slice of ``source``, one column per placement of the
    target resampled onto it (all (S, H, W) on the source's grid). The target is drawn as
    contours on the source: its outline (yellow) and its median tissue level (cyan), which
    follow the head, the ventricles and the sulci whatever the two contrasts are."""
    picks = pick_slices(source.shape[0])
    images = minmax_slices(source[picks])
    overlays = {name: _contours(target) for name, target in placements.items()}
    panels = dict.fromkeys(placements, images)
    return save_grid(path, title, picks, panels, overlays, size=3.0)


def _contours(target: np.ndarray) -> Overlay:
    inside = target[target > 0]  # 0: outside the target's volume
    outline = foreground_threshold(inside) if inside.size else 0.0
    head = inside[inside > outline]
    tissue = float(np.median(head)) if head.size else outline

    def draw(axis: Axes, index: int) -> None:
        # A little smoothing keeps the contours from tracing noise.
        smooth = ndimage.gaussian_filter(target[index], 1.5)
        axis.contour(smooth, levels=[outline], colors="yellow", linewidths=0.6)
        axis.contour(smooth, levels=[tissue], colors="cyan", linewidths=0.5)

    return draw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+", type=Path, help="folders of studies, searched deep")
    parser.add_argument("--figure", type=Path, help="write an overlay of --pair here (PNG)")
    parser.add_argument("--pair", help="the study of the figure, as the report labels it")
    parser.add_argument(
        "--direction",
        choices=[direction.value for direction in Direction],
        default=Direction.T1_TO_T2,
    )
    args = parser.parse_args(argv)
    if (args.figure is None) != (args.pair is None):
        parser.error("--figure and --pair go together")
    # Each folder on its own, so that studies are labelled by their folder under it.
    pairs = [pair for root in args.data for pair in find_pairs([root]).pairs]
    chosen = [pair for pair in pairs if pair.label == args.pair]
    if args.pair and not chosen:
        parser.error(f"--pair {args.pair}: no such pair under the data folders")

    for pair in pairs:
        for direction in Direction:
            try:
                paired = load_pair(pair, direction)
            except SeriesError as error:
                print(f"{direction} {pair.label}: not paired: {error}")
                continue
            took = f" [{paired.registration.seconds:.1f} s]" if paired.registration else ""
            print(f"{direction} {paired.summary()}{took}", flush=True)
    if chosen:
        header = load_pair(chosen[0], args.direction, register=False)
        registered = load_pair(chosen[0], args.direction)
        placements = {"header geometry": header.target, "registered": registered.target}
        title = f"{args.pair} ({args.direction}): the target's contours on the source"
        print(f"wrote {save_overlay(args.figure, title, header.source.pixels, placements)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
