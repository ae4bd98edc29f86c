"""One synthesis: source series files in, the synthetic series' datasets out.

The worker and `dicomnode translate` (``translate_series``) both call `synthesize_series`,
so the node and the offline tool produce the same images and headers from the same input
and model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset

from pipeline.dicom.contrast import Classification, Contrast, Direction, classify
from pipeline.dicom.derived import (
    DerivedKind,
    ModelIdentity,
    build_synthetic_series,
    derived_series_uid,
    write_series,
)
from pipeline.dicom.label import burn_label, label_fits
from pipeline.dicom.reformat import axial_view
from pipeline.dicom.seriesfiles import SeriesFiles
from pipeline.dicom.volume import SeriesError, load_series
from pipeline.model.card import ModelCard, ModelFileError, describe
from pipeline.model.inference import Synthesizer, Synthesizers, pick_device
from pipeline.model.lesionfidelity import held_out_lesion_fidelity
from pipeline.model.overshoot import Overshoot, measure_overshoot
from pipeline.model.preprocess import head_mask, to_stored_pixels
from pipeline.model.registry import RegistryError
from pipeline.model.uncertainty import series_uncertainty
from pipeline.settings import DEFAULT_OUTPUT, OutputSettings

# What is burnt into each kind of derived image.
LABELS = {DerivedKind.SYNTHETIC: "SYNTHETIC", DerivedKind.UNCERTAINTY: "UNCERTAINTY"}


@dataclass(frozen=True, eq=False)
class SynthesisResult:
    datasets: list[Dataset]
    series_uid: str
    timings: dict[str, float]  # load_s, inference_s, build_s
    source_plane: str  # axial, or sagittal/coronal for a 3D series synthesized as axial
    overshoot: Overshoot  # output beyond the range the model learnt (pipeline.model.overshoot)
    # With uncertainty passes: the per-series uncertainty (pipeline.model.uncertainty), the
    # per-voxel spread on the source's grid, and its derived series when asked for.
    uncertainty: float | None = None
    spread: np.ndarray | None = None
    uncertainty_datasets: list[Dataset] = field(default_factory=list)

    def overshoot_note(self) -> str | None:
        """What an admin reads of output beyond the model's learnt range; None: there is none."""
        overshoot = self.overshoot
        if overshoot.volume_ml == 0:
            return None
        image = self.datasets[overshoot.peak_slice].InstanceNumber
        return (
            f"{overshoot.volume_ml:.2f} mL of the synthetic series is brighter than anything "
            f"its model learnt to draw (up to {overshoot.peak:.1f} times the top of its range, "
            f"in image {image}): the sign of an artefact"
        )


def lesion_caution(card: ModelCard, target: Contrast) -> str:
    """What a reader of ``card``'s synthetic ``target`` image must know of its lesions: how
    visible they stayed on patients the model never saw, as its card measured them."""
    measured = held_out_lesion_fidelity(card.metrics)
    if measured is None:
        seen = (
            f"how visible a lesion stays in this model's {target} image on patients it never "
            "saw was not measured"
        )
    else:
        seen = (
            f"on patients this model never saw, a lesion kept {measured.percent()} of its "
            f"contrast in a real {target} image ({measured.studies} studies with lesion masks)"
        )
    return f"Lesions: {seen}; a synthetic image does not rule out a lesion."


def synthesize_series(
    paths: Sequence[Path],
    synthesizer: Synthesizer,
    direction: Direction,
    software_version: str,
    output_settings: OutputSettings = DEFAULT_OUTPUT,
    uncertainty_passes: int = 0,
    uncertainty_series: bool = False,
) -> SynthesisResult:
    """Synthesize the ``direction.target`` series from the source files at ``paths``.

    With ``uncertainty_passes``, also the Monte-Carlo dropout uncertainty (that many extra
    passes), and with ``uncertainty_series`` its map as a derived series of its own.
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
    output, spread = synthesizer.synthesize_with_spread(
        view.pixels, view.pixel_spacing, view.slice_offsets, uncertainty_passes
    )
    output = view.to_source(output)
    overshoot = measure_overshoot(output, card.output_normalization, volume.voxel_mm3)
    head = head_mask(volume.pixels)
    inferred = time.perf_counter()
    identity = ModelIdentity(card.name, card.version, card.checksum)
    caution = lesion_caution(card, direction.target)

    def derived(values: np.ndarray, kind: DerivedKind) -> list[Dataset]:
        stored = to_stored_pixels(values)
        pixels = stored.pixels
        label = LABELS[kind]
        labelled = output_settings.burn_in_label and label_fits(pixels.shape[1:], label)
        if labelled:
            # As bright as the top of the window: white in the viewer's opening view.
            top = int(stored.window_center + stored.window_width / 2)
            pixels = burn_label(pixels, head, label, min(top, 2**stored.bits_stored - 1))
        return build_synthetic_series(
            volume,
            pixels,
            bits_stored=stored.bits_stored,
            window_center=stored.window_center,
            window_width=stored.window_width,
            target_contrast=direction.target,
            model=identity,
            software_version=software_version,
            burned_in=labelled,
            kind=kind,
            caution=caution if kind is DerivedKind.SYNTHETIC else "",
        )

    datasets = derived(output, DerivedKind.SYNTHETIC)
    uncertainty, map_datasets = None, []
    if spread is not None:
        spread = view.to_source(spread)
        uncertainty = series_uncertainty(output, spread, head)
        if uncertainty_series:
            map_datasets = derived(spread, DerivedKind.UNCERTAINTY)
    built = time.perf_counter()
    return SynthesisResult(
        datasets,
        derived_series_uid(volume.headers[0].SeriesInstanceUID, identity),
        {
            "load_s": round(loaded - started, 3),
            "inference_s": round(inferred - loaded, 3),
            "build_s": round(built - inferred, 3),
            "uncertainty_passes": uncertainty_passes,
        },
        view.plane,
        overshoot,
        uncertainty,
        spread,
        map_datasets,
    )


@dataclass(frozen=True)
class Translation:
    """What `translate_series` made of one series: written, skipped (no ``direction``: its
    contrast is neither T1 nor T2), or failed (``error`` says why)."""

    series: SeriesFiles
    classification: Classification
    direction: Direction | None
    result: SynthesisResult | None = None
    folder: Path | None = None  # where the synthetic series was written
    error: str | None = None


def translate_series(
    found: Iterable[SeriesFiles],
    output: Path,
    model_for: Callable[[Direction], Path],
    software_version: str,
    direction: Direction | None = None,
) -> Iterator[Translation]:
    """Synthesize each series of ``found`` into ``output/<synthetic series UID>/``, offline.

    ``direction`` forces one; else each series' classified contrast implies it, and a
    series of another contrast is skipped. ``model_for`` names the model file of a
    direction (RegistryError when it has none). Each model is loaded once, on the GPU when
    torch sees one. A series that cannot be synthesized, or a model that cannot be used,
    fails that series only.
    """
    synthesizers = Synthesizers(pick_device())
    for series in found:
        classification = classify(series.header)
        wanted = direction or Direction.for_source(classification.contrast)
        if wanted is None:
            yield Translation(series, classification, None)
            continue
        try:
            synthesizer = synthesizers.get(model_for(wanted))
            result = synthesize_series(series.files, synthesizer, wanted, software_version)
        except (SeriesError, ModelFileError, RegistryError) as error:
            yield Translation(series, classification, wanted, error=str(error))
            continue
        folder = output / result.series_uid
        write_series(result.datasets, folder)
        yield Translation(series, classification, wanted, result, folder)
