"""Evaluating a model on paired studies through the node's own inference path.

Every source series goes whole through ``pipeline.model.inference.Synthesizer`` and
``pipeline.model.preprocess.to_stored_pixels``, as a job would, and what the node would send is
compared with the real target on the usable slices (see
``train.pairs``): per study, per patient (slices of all its studies pooled) and overall
(the mean of the patients, so a patient with two studies does not count twice). Beside
every score stand the trivial floors of ``train.metrics.floors``. Where an expert's lesion
mask exists, each predictor's lesion fidelity is scored on the study's whole volume; on
every study, its spurious foci (lesion-like foci the real target lacks).
``evaluate_folders`` is all of `dicomnode evaluate`: pairs found in folders, figures, a
JSON report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dicom.contrast import Contrast, Direction
from pipeline.dicom.derived import instance_numbers
from pipeline.dicom.reformat import axial_volume
from pipeline.dicom.volume import SeriesError, load_series
from pipeline.model.card import LoadedModel, describe
from pipeline.model.inference import Synthesizer
from pipeline.model.overshoot import Overshoot, measure_overshoot
from pipeline.model.preprocess import head_mask, normalize_volume, to_stored_pixels
from pipeline.model.scores import mean_metrics, minmax_slices, slice_metrics
from pipeline.settings import OutputSettings
from train.figures import FIGURE_SLICES, save_comparison
from train.lesions import LesionMaskError, LesionMasks
from train.metrics import (
    Focus,
    LesionFidelity,
    SpuriousFoci,
    SpuriousFociScorer,
    collapse_check,
    floors,
    lesion_fidelity,
)
from train.pairs import PairedVolume, StudyGroup, find_pairs, load_pair

PREDICTORS = ("model", "input", "inverted")
# What "better" means when two models or a model and a floor are compared: the paper's
# PSNR, SSIM and the correlation, inside the head, where the anatomy a reader looks at is.
KEY_METRICS = ("psnr_head", "ssim_head", "corr_head")
# The model's largest spurious foci are listed with where to find them, for a reader to
# look at; the rest are in the count.
LISTED_FOCI = 5


@dataclass(frozen=True)
class FocusSite:
    """Where a reader finds one of the model's spurious foci: the image of the synthetic
    series through the focus's peak (its InstanceNumber; None where the source was
    reformatted to axial for evaluation, so no image of the series is that slice), the peak
    in patient coordinates (LPS, mm), the focus's size and its contrast in rank."""

    image: int | None
    position_mm: tuple[float, float, float]
    volume_ml: float
    contrast: float


@dataclass
class StudyResult:
    label: str
    patient: str
    group: StudyGroup
    slices: int
    dropped: dict[str, int]
    metrics: dict[str, dict[str, float]]  # predictor -> metric -> mean over slices
    collapse: dict[str, float | bool]
    lesions: dict[str, LesionFidelity] | None  # predictor -> fidelity, where a mask exists
    spurious: dict[str, SpuriousFoci]  # predictor -> foci the real target does not show
    spurious_sites: list[FocusSite]  # the model's largest spurious foci, largest first
    overshoot: Overshoot  # the model's output beyond the range it learnt, whole volume
    per_slice: dict[str, dict[str, list[float]]] = field(repr=False)
    # Kept for figures: normalised source, raw output, normalised target (usable slices).
    images: tuple[np.ndarray, np.ndarray, np.ndarray] = field(repr=False)
    # Slices (of the usable ones) a figure should show: those with the most lesion.
    focus: list[int] | None = None


@dataclass
class Evaluation:
    model: str
    direction: Direction
    studies: list[StudyResult]

    def patients(self) -> dict[str, dict[str, dict[str, float]]]:
        """patient -> predictor -> metric, pooled over the slices of the patient's studies."""
        pooled: dict[str, dict[str, dict[str, list[float]]]] = {}
        for study in self.studies:
            into = pooled.setdefault(study.patient, {})
            for predictor, values in study.per_slice.items():
                for key, items in values.items():
                    into.setdefault(predictor, {}).setdefault(key, []).extend(items)
        return {
            patient: {predictor: mean_metrics(values) for predictor, values in by.items()}
            for patient, by in pooled.items()
        }

    def overall(self) -> dict[str, dict[str, float]]:
        """predictor -> metric: the mean over patients."""
        patients = list(self.patients().values())
        if not patients:
            return {}
        return {
            predictor: {
                key: float(np.mean([p[predictor][key] for p in patients]))
                for key in patients[0][predictor]
            }
            for predictor in PREDICTORS
        }

    def groups(self) -> dict[str, dict[str, dict[str, float]]]:
        """group -> predictor -> metric: the mean over the group's studies."""
        by_group: dict[str, list[StudyResult]] = {}
        for study in self.studies:
            by_group.setdefault(study.group.value, []).append(study)
        return {
            group: {
                predictor: {
                    key: float(np.mean([s.metrics[predictor][key] for s in studies]))
                    for key in studies[0].metrics[predictor]
                }
                for predictor in PREDICTORS
            }
            for group, studies in by_group.items()
        }

    def lesion_fidelity(self) -> dict[str, float]:
        """predictor -> mean lesion fidelity over the studies with a mask (empty: none)."""
        return {
            predictor: float(np.mean(values))
            for predictor in PREDICTORS
            if (values := self._fidelities(predictor))
        }

    def _fidelities(self, predictor: str) -> list[float]:
        return [
            fidelity
            for study in self.studies
            if study.lesions is not None
            and (fidelity := study.lesions[predictor].fidelity) is not None
        ]

    def spurious_foci(self) -> dict[str, dict[str, float]]:
        """predictor -> the mean over studies of its spurious foci (count, volume_ml)."""
        if not self.studies:
            return {}
        return {
            predictor: {
                key: float(np.mean([getattr(s.spurious[predictor], key) for s in self.studies]))
                for key in ("count", "volume_ml")
            }
            for predictor in PREDICTORS
        }

    def collapsed(self) -> bool:
        return any(bool(study.collapse["collapsed"]) for study in self.studies)

    def held_for_overshoot(self) -> list[str]:
        """The studies whose synthesis a node would hold for output beyond the model's learnt
        range (at the default ``[output] hold_overshoot_above_ml``)."""
        limit = OutputSettings().hold_overshoot_above_ml
        return [s.label for s in self.studies if s.overshoot.volume_ml > limit]

    def beats_floors(self) -> bool:
        """Whether the model is better than both floors on every key metric, overall."""
        overall = self.overall()
        return bool(overall) and all(
            overall["model"][key] > overall[floor][key]
            for key in KEY_METRICS
            for floor in ("input", "inverted")
        )

    def report(self) -> dict[str, Any]:
        """JSON-ready: studies, patients, overall, floors beside the model, collapse check."""
        return {
            "model": self.model,
            "direction": self.direction,
            "metric_definitions": (
                "paper eq. 1-3 on per-slice min-max normalised images, PSNR with MAX_I = 1, "
                "SSIM (Gaussian 11x11, sigma 1.5), Pearson correlation (corr); *_slice over "
                "the whole slice, *_head inside the head mask; per-slice values averaged; "
                "overall = mean of patients; lesion fidelity = (P_synthetic - 0.5) / "
                "(P_real - 0.5), P the probability that a lesion voxel is brighter than a "
                "voxel 1-5 mm around the lesion, over the study's volume; spurious foci = "
                "connected foci of at least 20 mm3 that stand out from the tissue within "
                "~4 mm by 0.3 in intensity rank in the prediction and by less than half that "
                "in the real target, in the target's lesion polarity (T2 bright, T1 dark)"
            ),
            "studies": [
                {
                    "study": s.label,
                    "patient": s.patient,
                    "group": s.group.value,
                    "slices": s.slices,
                    "dropped": s.dropped,
                    "metrics": s.metrics,
                    "collapse": s.collapse,
                    "lesions": None
                    if s.lesions is None
                    else {
                        predictor: {**asdict(value), "fidelity": value.fidelity}
                        for predictor, value in s.lesions.items()
                    },
                    "spurious": {
                        predictor: asdict(value) for predictor, value in s.spurious.items()
                    },
                    "spurious_sites": [asdict(site) for site in s.spurious_sites],
                    "overshoot": asdict(s.overshoot),
                }
                for s in self.studies
            ],
            "patients": self.patients(),
            "groups": self.groups(),
            "lesion_fidelity": self.lesion_fidelity(),
            "spurious_foci": self.spurious_foci(),
            "overall": self.overall(),
            "collapsed": self.collapsed(),
            "beats_floors": self.beats_floors(),
        }


def evaluate(model: LoadedModel, paired: list[PairedVolume]) -> Evaluation:
    """Run ``model`` over the source of every pair and score it against the real target."""
    synthesizer = Synthesizer(model)
    studies = []
    for item in paired:
        if item.direction != model.card.direction:
            raise ValueError(
                f"{item.pair.label} was paired for {item.direction}, the model is "
                f"{model.card.direction}"
            )
        output = synthesizer.synthesize(
            np.asarray(item.source.pixels), item.source.pixel_spacing, item.source.slice_offsets
        )
        keep = item.slices
        covered, head = item.covered[keep], item.head[keep]
        source = minmax_slices(item.source.pixels[keep])
        real = minmax_slices(item.target[keep])
        # Scored as the node sends it: clipped to [0, 1] and stored as 12-bit pixels.
        sent_volume = to_stored_pixels(output).pixels
        sent = sent_volume[keep]
        predictions = {"model": minmax_slices(sent), **floors(source, head)}
        per_slice = {
            name: slice_metrics(prediction, real, covered, head)
            for name, prediction in predictions.items()
        }
        # In the network's own space: the spread of its raw output against the target's.
        target_normalized = normalize_volume(item.target, model.card.output_normalization)[keep]
        spurious, sites = _spurious(item, sent_volume)
        studies.append(
            StudyResult(
                label=item.pair.label,
                patient=item.pair.patient,
                group=item.group,
                slices=len(keep),
                dropped=item.dropped,
                metrics={name: mean_metrics(values) for name, values in per_slice.items()},
                collapse=collapse_check(output[keep], head & covered, target_normalized),
                lesions=_lesions(item, sent_volume),
                spurious=spurious,
                spurious_sites=sites,
                overshoot=measure_overshoot(
                    output, model.card.output_normalization, item.source.voxel_mm3
                ),
                per_slice=per_slice,
                # The figure shows what the node sends, as the scores do.
                images=(source, predictions["model"], real),
                focus=_lesion_slices(item),
            )
        )
    return Evaluation(describe(model.card), model.card.direction, studies)


@dataclass(frozen=True)
class FolderEvaluation:
    report: dict[str, Any]  # the pairs' Evaluation.report() and the unpaired series' checks
    path: Path | None  # where the report was written; None: nothing could be evaluated
    collapsed: bool


def evaluate_folders(
    model: LoadedModel,
    data: Sequence[Path],
    report_folder: Path,
    *,
    register: bool = True,
    lesions: LesionMasks | None = None,
    say: Callable[[str], None] = print,
) -> FolderEvaluation:
    """Score ``model`` on every pair under ``data`` (``evaluate``), and check the source
    series without a partner for collapse; a figure of each patient's largest study and of
    each unpaired series, and the report as JSON, go to ``report_folder``. ``say`` gets
    what was found, skipped and written, a line each.
    """
    direction = model.card.direction
    search = find_pairs(data)
    for note in search.notes:
        say(note)
    paired: list[PairedVolume] = []
    for pair in search.pairs:
        try:
            paired.append(load_pair(pair, direction, register, lesions=lesions))
        except (SeriesError, LesionMaskError) as error:
            say(f"{pair.label}: not evaluated: {error}")
            continue
        say(paired[-1].summary())
    paired = [item for item in paired if len(item.slices)]
    stem = f"{model.card.name}-{model.card.version}"
    # Scores on what the model learnt from say nothing of new patients: the card names them.
    data = model.card.training.get("data")
    trained_on = {entry["patient"] for entry in data} if isinstance(data, list) else set()
    for item in paired:
        if item.pair.patient in trained_on:
            say(
                f"warning: {item.pair.label} ({item.pair.patient}): this patient is in "
                f"{stem}'s training data, so its scores overstate the model"
            )
    report: dict[str, Any] = {"model": stem, "pairs": None, "unpaired": []}
    collapsed = False
    if paired:
        result = evaluate(model, paired)
        say(format_table(result))
        report["pairs"] = result.report()
        collapsed = result.collapsed()
        for patient in {study.patient for study in result.studies}:
            studies = [s for s in result.studies if s.patient == patient]
            # The patient's largest study: the figure should show the most anatomy.
            study = max(studies, key=lambda s: s.slices)
            figure = save_comparison(
                report_folder / f"{stem}-{patient}.png",
                f"{model.card.name} {model.card.version} ({direction}) on {study.label}",
                *study.images,
                focus=study.focus,
            )
            say(f"figure: {figure}")
    for contrast, series in search.unpaired:
        if contrast is not direction.source:
            continue
        try:
            volume = axial_volume(load_series(series.files))
        except SeriesError as error:
            say(f"{series.folder}: not evaluated: {error}")
            continue
        output = Synthesizer(model).synthesize(
            volume.pixels, volume.pixel_spacing, volume.slice_offsets
        )
        check = collapse_check(output, head_mask(volume.pixels))
        collapsed = collapsed or bool(check["collapsed"])
        figure = save_comparison(
            report_folder / f"{stem}-{series.folder.parent.name}-unpaired.png",
            f"{model.card.name} {model.card.version} ({direction}) on {series.folder} (no "
            "real target)",
            volume.pixels,
            to_stored_pixels(output).pixels,
        )
        report["unpaired"].append(
            {"series": str(series.folder), "collapse": check, "figure": str(figure)}
        )
        say(f"{series.folder}: no pair; output spread {check['spread']:.3f}; figure: {figure}")
    if report["pairs"] is None and not report["unpaired"]:
        return FolderEvaluation(report, None, collapsed)
    report_folder.mkdir(parents=True, exist_ok=True)
    path = report_folder / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return FolderEvaluation(report, path, collapsed)


def _lesion_slices(item: PairedVolume, count: int = FIGURE_SLICES) -> list[int] | None:
    """Slices spread over the lesion's extent (those with at least half the largest
    lesion area), so a figure shows the lesion at several levels, not four neighbours."""
    if item.lesions is None:
        return None
    area = item.lesions[item.slices].sum(axis=(1, 2))
    if not area.any():
        return None
    candidates = np.flatnonzero(area >= area.max() / 2)
    spread = np.linspace(0, len(candidates) - 1, min(count, len(candidates)))
    return sorted({int(candidates[round(i)]) for i in spread})


def _lesions(item: PairedVolume, sent: np.ndarray) -> dict[str, LesionFidelity] | None:
    """Each predictor's lesion fidelity over the usable slices, on whole-volume intensities
    (per-slice scaling would move a lesion's voxels against those of other slices)."""
    keep = item.slices
    if item.lesions is None or not item.lesions[keep].any():
        return None
    images, region, spacing = _whole_volumes(item, sent)
    return {
        name: lesion_fidelity(image, item.target[keep], item.lesions[keep], region, spacing)
        for name, image in images.items()
    }


def _spurious(
    item: PairedVolume, sent: np.ndarray
) -> tuple[dict[str, SpuriousFoci], list[FocusSite]]:
    """Each predictor's spurious foci over the usable slices, outside the expert's lesions,
    bright where the target is a T2 and dark where it is a T1 (as lesions show there); and
    where the model's largest are."""
    keep = item.slices
    images, region, spacing = _whole_volumes(item, sent)
    bright = Direction.parse(item.direction, "direction").target is Contrast.T2
    known = None if item.lesions is None else item.lesions[keep]
    scorer = SpuriousFociScorer(item.target[keep], region, spacing, bright=bright, known=known)
    found = {name: scorer.foci(image) for name, image in images.items()}
    sites = _sites(item, found["model"][:LISTED_FOCI])
    return {name: scorer.summarize(foci) for name, foci in found.items()}, sites


def _sites(item: PairedVolume, foci: list[Focus]) -> list[FocusSite]:
    """Where each of ``foci`` (found on the usable slices) lies in the source series, which
    the synthetic series shares slice for slice."""
    source = item.source
    images = instance_numbers(source.headers) if source.headers else None
    # One row down, one column right, from the slice's own position (exact for a series
    # whose slices are not evenly spaced, as the affine's slice axis is not).
    steps = source.affine()[:3, 1:3]
    sites = []
    for focus in foci:
        usable_slice, row, column = focus.peak
        index = int(item.slices[usable_slice])
        position = source.positions[index] + steps @ np.array([row, column], dtype=float)
        sites.append(
            FocusSite(
                image=None if images is None else images[index],
                position_mm=tuple(round(float(value), 1) for value in position),
                volume_ml=focus.volume_mm3 / 1000,
                contrast=focus.contrast,
            )
        )
    return sites


def _whole_volumes(
    item: PairedVolume, sent: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[float, float, float]]:
    """Each predictor on the usable slices in whole-volume intensities, the region where
    the real target is defined, and the voxel spacing (between slices, rows, columns)."""
    keep = item.slices
    source = item.source.pixels[keep]
    head = item.head[keep]
    images = {"model": sent[keep], "input": source, "inverted": np.where(head, -source, 0.0)}
    spacing = (item.source.slice_spacing, *map(float, item.source.pixel_spacing))
    return images, head & item.covered[keep], spacing


def format_table(evaluation: Evaluation) -> str:
    """The overall and per-patient scores with the floors, as aligned text for a terminal."""
    columns = (
        "mse_slice",
        "mae_slice",
        "psnr_slice",
        "ssim_slice",
        "psnr_head",
        "ssim_head",
        "corr_head",
    )
    lines = [f"{evaluation.model} ({evaluation.direction})"]
    header = f"{'':28} {'predictor':9} " + " ".join(f"{c:>10}" for c in columns)
    lines.append(header)
    rows = [(p, m) for p, m in evaluation.patients().items()] + [("overall", evaluation.overall())]
    for who, by_predictor in rows:
        for predictor in PREDICTORS:
            values = by_predictor[predictor]
            lines.append(
                f"{who:28} {predictor:9} " + " ".join(f"{values[c]:10.4f}" for c in columns)
            )
    for study in evaluation.studies:
        lines.append(
            f"{study.label} ({study.patient}): {study.slices} slices, output spread "
            f"{study.collapse['spread']:.3f} (target {study.collapse['reference_spread']:.3f})"
            + ("  COLLAPSED" if study.collapse["collapsed"] else "")
        )
        if study.lesions is not None:
            lines.append(
                f"  lesions ({study.lesions['model'].voxels} voxels): "
                + _fidelity_line(study.lesions)
            )
        lines.append(
            "  spurious foci (lesion-like, not in the real image): "
            + "; ".join(
                f"{predictor} {foci.count} ({foci.volume_ml:.2f} mL)"
                for predictor, foci in study.spurious.items()
            )
        )
        if study.spurious_sites:
            lines.append(
                "  the model's largest: " + "; ".join(map(_site_text, study.spurious_sites))
            )
        if study.overshoot.volume_ml > 0:
            lines.append(
                f"  beyond the learnt range: {study.overshoot.volume_ml:.2f} mL, up to "
                f"{study.overshoot.peak:.2f} times its top (a node holds such a series)"
            )
    return "\n".join(lines)


def _site_text(site: FocusSite) -> str:
    where = "" if site.image is None else f"image {site.image}, "
    x, y, z = site.position_mm
    return f"{where}({x:.0f}, {y:.0f}, {z:.0f}) mm LPS, {site.volume_ml:.2f} mL"


def _fidelity_line(lesions: dict[str, LesionFidelity]) -> str:
    real = lesions["model"].real
    shown = [f"visible in the real image with probability {real:.3f}"]
    for predictor, value in lesions.items():
        fidelity = value.fidelity
        shown.append(
            f"{predictor} {value.synthetic:.3f} (fidelity "
            + ("n/a: too faint in the real image" if fidelity is None else f"{fidelity:.2f}")
            + ")"
        )
    return "; ".join(shown)
