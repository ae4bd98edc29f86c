"""One synthesis: source series files in, the synthetic series' datasets out.

The worker and `dicomnode translate` both call `synthesize_series`, so the node and the
offline tool produce the same images and headers from the same input and model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset

from pipeline.dicom.contrast import Direction
from pipeline.dicom.derived import ModelIdentity, build_synthetic_series, derived_series_uid
from pipeline.dicom.reformat import axial_view
from pipeline.dicom.volume import load_series
from pipeline.model.card import ModelFileError, describe
from pipeline.model.inference import Synthesizer
from pipeline.model.preprocess import to_stored_pixels


@dataclass(frozen=True)
class SynthesisResult:
    datasets: list[Dataset]
    series_uid: str
    timings: dict[str, float]  # load_s, inference_s, build_s
    source_plane: str  # axial, or sagittal/coronal for a 3D series synthesized as axial


def synthesize_series(
    paths: Sequence[Path], synthesizer: Synthesizer, direction: Direction, software_version: str
) -> SynthesisResult:
    """Synthesize the ``direction.target`` series from the source files at ``paths``.

    Raises SeriesError (the series cannot be synthesized) or ModelFileError (the model does
    not synthesize ``direction``), each with a reason an admin can read.
    """
    card = synthesizer.card
    if card.direction != direction:
        raise ModelFileError(
            f"model {describe(card)} synthesizes {card.direction}, but {direction} "
            "is needed: fix the route's (or --model's) model"
        )
    started = time.perf_counter()
    volume = load_series(paths)
    # The models learnt axial slices: a synthetic image from a plane they never saw must not
    # reach a radiologist, so a 3D series is shown to them as axial, and a 2D one refused.
    view = axial_view(volume)
    loaded = time.perf_counter()
    output = synthesizer.synthesize(view.pixels, view.pixel_spacing, view.slice_offsets)
    stored = to_stored_pixels(view.to_source(output))
    inferred = time.perf_counter()
    identity = ModelIdentity(card.name, card.version, card.checksum)
    datasets = build_synthetic_series(
        volume,
        stored.pixels,
        bits_stored=stored.bits_stored,
        window_center=stored.window_center,
        window_width=stored.window_width,
        target_contrast=direction.target,
        model=identity,
        software_version=software_version,
    )
    built = time.perf_counter()
    return SynthesisResult(
        datasets,
        derived_series_uid(volume.headers[0].SeriesInstanceUID, identity),
        {
            "load_s": round(loaded - started, 3),
            "inference_s": round(inferred - loaded, 3),
            "build_s": round(built - inferred, 3),
        },
        view.plane,
    )
