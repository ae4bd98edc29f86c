"""The ablation of docs/ablation.md, reproducible with one command.

k-fold cross-validation by patient (``train.folds``: every patient held out once, a
patient's studies together), both directions, several seeds, every model scored on its
held-out patients through the node's inference path beside the trivial floors, with lesion
fidelity wherever an expert's mask exists::

    .venv/bin/python -m train.ablation ../shared/data/mr-brain ../shared/data/mr-brain-more \\
        --lesions ../shared/data/lesions --configs v4 v5 --seeds 0 1 --out var/kfold

Each run (direction, configuration, seed, fold) is written to its own file under
OUT/runs/ as soon as it finishes (its model under OUT/models/), so a rerun skips what is
done and several processes (``--directions``, ``--folds``, ``--seeds`` split the work) can
fill one OUT at once.
``--rescore`` trains nothing: it scores the kept models of finished runs again where their
records lack a metric added since (spurious foci, say).
OUT/tables.md holds the tables, OUT/<config>-<direction>.json one summary per
configuration and direction (the held-out metrics ``dicomnode train --reference-metrics``
puts on a card) and OUT/figures/ each held-out study's figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dicom.contrast import Direction
from pipeline.model.card import LoadedModel, ModelCard, load_model, save_model, weights_checksum
from pipeline.model.preprocess import input_channels
from pipeline.model.registry import ModelRegistry
from pipeline.model.unet import default_arguments
from pipeline.settings import OutputSettings
from train.dataset import TrainingStudy, prepare_study
from train.evaluate import PREDICTORS, evaluate
from train.figures import save_comparison
from train.folds import DEFAULT_FOLDS, Fold, patient_folds
from train.lesions import LesionMasks
from train.pairs import PairedVolume, find_pairs, load_pair
from train.trainer import TrainSettings, shipped_arguments, train_network
from train.workflow import load_reference_metrics

# name -> (what it is, its settings beyond the run's size). Every entry names its
# normalisation and loss, so that no configuration depends on TrainSettings' defaults.
# target_normalization None: the targets are normalised like the input.
# Every lever off and v4's length: what the configurations below add to.
_PLAIN = {
    "neighbour_distance_mm": None,
    "lesion_painting": 0.0,
    "lesion_weight": 0.0,
    "edge_weight": 0.0,
    "thick_slices": 0.0,
    "lesion_oversampling": 0.0,
    "epochs": 12,
}
_PAPER = {
    **_PLAIN,
    "normalization": "minmax-slice",
    "target_normalization": None,
    "loss": "mse",
}
# The recipe of the v4 models: the input median-scaled, percentile targets, MSE + SSIM.
_V4 = {
    **_PLAIN,
    "normalization": "median-volume",
    "target_normalization": "percentile-volume",
    "loss": "mse+ssim",
}
# The levers of docs/ablation.md, each added to v4's recipe alone, then together.
_NEIGHBOURS = {"neighbour_distance_mm": 3.0}
_PAINT = {"lesion_painting": 0.5}
_THICK = {"thick_slices": 0.3}
_OVERSAMPLE = {"lesion_oversampling": 0.2}
_ALL = {**_V4, **_NEIGHBOURS, **_PAINT, **_THICK, **_OVERSAMPLE}
# The shipped t1-to-t2 v7: v5 at base width 16 with a small lesion painted into every crop.
_PLAQUES = {
    **_ALL,
    "epochs": 24,
    "base_width": 16,
    "lesion_painting": 1.0,
    "painted_tumour_share": 0.0,
}
CONFIGURATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper": ("the paper's U-Net: image + Sobel x/y, per-slice min-max, MSE", _PAPER),
    "plain-unet": (
        "baseline: U-Net without gradient channels",
        {**_PAPER, "gradient_channels": False},
    ),
    "encoder-decoder": ("baseline: no skip connections", {**_PAPER, "skip_connections": False}),
    "v4": ("the v4 recipe: median-scaled input, percentile targets, MSE + SSIM", _V4),
    "v4-neighbours": (
        "v4 + the slices 3 mm below and above as input (2.5-D)",
        {**_V4, **_NEIGHBOURS},
    ),
    "v4-paint": ("v4 + lesions painted into half of the crops", {**_V4, **_PAINT}),
    "v4-thick": ("v4 + thin-slice studies shown as 5 mm slabs in 30% of crops", {**_V4, **_THICK}),
    "v4-oversample": ("v4 + 20% of crops centred on masked lesions", {**_V4, **_OVERSAMPLE}),
    # The two levers that moved lesion fidelity alone, at a higher dose.
    "v4-oversample-50": (
        "v4 + 50% of crops centred on masked lesions",
        {**_V4, "lesion_oversampling": 0.5},
    ),
    "v4-paint-all": ("v4 + lesions painted into every crop", {**_V4, "lesion_painting": 1.0}),
    "all": ("v4 + neighbours, painted lesions, thick slabs, lesion oversampling", _ALL),
    "all-no-paint": (
        "all but the painted lesions",
        {**_ALL, "lesion_painting": 0.0},
    ),
    "all-shortcut": (
        "all, plus a learnt affine map of the input added to the output",
        {**_ALL, "input_shortcut": True},
    ),
    "all-weighted": ("all, painted pixels weighing 5 in the loss", {**_ALL, "lesion_weight": 4.0}),
    "all-l1": ("all, with L1 + SSIM instead of MSE + SSIM", {**_ALL, "loss": "l1+ssim"}),
    "all-long": ("all, trained twice as long (24 x 150 steps)", {**_ALL, "epochs": 24}),
    "v4-long": ("v4, trained twice as long (24 x 150 steps)", {**_V4, "epochs": 24}),
    "v5-shortcut": (
        "v5 plus a learnt affine map of the input added to the output",
        {**_ALL, "epochs": 24, "input_shortcut": True},
    ),
    "v5-b16": (
        "v5 at base width 16 (the shipped t2-to-t1 v6, and t1-to-t2 v6, v7's rollback)",
        {**_ALL, "epochs": 24, "base_width": 16},
    ),
    "v5-b16-edges": (
        "v5-b16 with a gradient-difference term (weight 0.5) beside MSE + SSIM",
        {**_ALL, "epochs": 24, "base_width": 16, "edge_weight": 0.5},
    ),
    "v5-b16-paint-tumours": (
        "v5-b16 with every painting a tumour with oedema, on half the crops (50 % of the "
        "crops tumour-like, v5-b16-paint-all's 60 %, with half the crops kept healthy)",
        {**_ALL, "epochs": 24, "base_width": 16, "painted_tumour_share": 1.0},
    ),
    "v5-b16-paint-plaques": (
        "v5-b16 with small lesions (MS plaques) painted into every crop, no tumours (a "
        "lesion in every crop, without the large paintings that cost a healthy brain; the "
        "shipped t1-to-t2 v7)",
        _PLAQUES,
    ),
    "v5-b16-paint-plaques-long": (
        "v5-b16-paint-plaques (t1-to-t2 v7) trained twice as long (48 x 150 steps): the "
        "budget lever not yet measured at base width 16",
        {**_PLAQUES, "epochs": 48},
    ),
    "v5-b16-paint-plaques-long-bf16": (
        "v5-b16-paint-plaques-long with the convolutions in bfloat16 (about 1.5x the crops "
        "a second on these CPUs): whether CPU rounds can run in it at no cost held out",
        {**_PLAQUES, "epochs": 48, "precision": "bfloat16"},
    ),
    "v5-b16-context": (
        "v5-b16 on crops of 192 instead of 96, 4 a step instead of 16 (the same pixels): "
        "a tumour's oedema with the anatomy around it in one crop",
        {**_ALL, "epochs": 24, "base_width": 16, "crop": 192, "batch_size": 4},
    ),
    "v5-b16-paint-all": (
        "v5-b16 with lesions painted into every crop (v4-paint-all's gain on the glioma)",
        {**_ALL, "epochs": 24, "base_width": 16, "lesion_painting": 1.0},
    ),
    "v5-subtle": (
        "v5 with painted lesions fainter on T1 (a T1 share of 0.1-0.5 of the fluid fraction)",
        {**_ALL, "epochs": 24, "painted_t1_share": (0.1, 0.5)},
    ),
    "v5": (
        "the v5 recipe: v4 + neighbours 3 mm, painted lesions, thick slabs, lesion "
        "oversampling, 24 x 150 steps",
        {**_ALL, "epochs": 24},
    ),
    "all-b16": ("all, base width 16", {**_ALL, "base_width": 16}),
}
# Keys of a configuration that are the network's arguments rather than TrainSettings fields.
NETWORK_KEYS = ("skip_connections", "upsampling", "input_shortcut", "base_width")
# What evaluate() reports for every study now; a finished run whose record lacks one of
# these is scored again by --rescore.
REPORTED_PER_STUDY = {"metrics", "lesions", "spurious", "overshoot"}
TABLE_METRICS = ("psnr_head", "ssim_head", "corr_head", "psnr_slice", "ssim_slice", "mae_slice")


def settings_for(configuration: str, base: TrainSettings) -> TrainSettings:
    """``base`` (the run's size, seed and budget) changed as ``configuration`` says; the
    network's input channels follow from what the input is made of."""
    changes = dict(CONFIGURATIONS[configuration][1])
    arguments = dict(base.arguments)
    for key in NETWORK_KEYS:
        if key in changes:
            arguments[key] = changes.pop(key)
    arguments["in_channels"] = input_channels(
        changes.get("gradient_channels", base.gradient_channels),
        changes.get("neighbour_distance_mm", base.neighbour_distance_mm) is not None,
    )
    return replace(base, arguments=arguments, **changes)


def _run_folder(direction: str, configuration: str, seed: int) -> Path:
    return Path(direction) / configuration / f"seed-{seed}"


def run_path(out: Path, direction: str, configuration: str, seed: int, fold: Fold) -> Path:
    return out / "runs" / _run_folder(direction, configuration, seed) / f"{fold.name()}.json"


def model_path(out: Path, direction: str, configuration: str, seed: int, fold: Fold) -> Path:
    return out / "models" / _run_folder(direction, configuration, seed) / f"{fold.name()}.pt"


def _rescore(path: Path, model: Path, test: list[PairedVolume]) -> None:
    record = json.loads(path.read_text())
    current = {key for study in record["evaluation"]["studies"] for key in study}
    if current >= REPORTED_PER_STUDY:
        return
    if not model.is_file():
        print(f"{path}: not scored again: its model {model} was not kept", file=sys.stderr)
        return
    print(f"{path}: scored again with {model}", file=sys.stderr, flush=True)
    record["evaluation"] = evaluate(load_model(model), test).report()
    path.write_text(json.dumps(record, indent=1) + "\n")


def run_ablation(
    data: list[Path],
    out: Path,
    base: TrainSettings,
    configurations: list[str],
    directions: list[str],
    seeds: list[int],
    fold_count: int = DEFAULT_FOLDS,
    only_folds: list[int] | None = None,
    lesions: LesionMasks | None = None,
    rescore: bool = False,
) -> None:
    """Run every (direction, configuration, seed, fold) that OUT does not hold yet; with
    ``rescore``, train nothing but evaluate the kept model of every finished run again
    where its record lacks a metric that ``evaluate`` reports now."""
    search = find_pairs(data)
    for direction in directions:
        paired = [
            load_pair(pair, direction, pixel_spacing_mm=base.pixel_spacing_mm, lesions=lesions)
            for pair in search.pairs
        ]
        paired = [item for item in paired if len(item.slices)]
        folds = patient_folds(paired, fold_count)
        _write_folds(out, folds, paired)
        prepared: dict[Any, list[TrainingStudy]] = {}
        for configuration in configurations:
            for seed in seeds:
                for fold in folds:
                    if only_folds and fold.number not in only_folds:
                        continue
                    path = run_path(out, direction, configuration, seed, fold)
                    test = [item for item in paired if item.pair.patient in fold.held_out]
                    if rescore and path.is_file():
                        saved = model_path(out, direction, configuration, seed, fold)
                        _rescore(path, saved, test)
                    if rescore or path.is_file():
                        continue
                    settings = replace(
                        settings_for(configuration, base), direction=direction, seed=seed
                    )
                    key = settings.study_preparation()
                    if key not in prepared:
                        prepared[key] = [prepare_study(item, settings) for item in paired]
                    training = [s for s in prepared[key] if s.patient not in fold.held_out]
                    record = _run(training, test, settings, configuration, fold, out)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(record, indent=1) + "\n")


def _run(
    training: list[TrainingStudy],
    test: list[PairedVolume],
    settings: TrainSettings,
    configuration: str,
    fold: Fold,
    out: Path,
) -> dict[str, Any]:
    label = f"{settings.direction}/{configuration}/seed-{settings.seed}/{fold.name()}"
    print(f"{label}: training on {len(training)} studies", file=sys.stderr, flush=True)
    started = time.perf_counter()
    trained = train_network(training, [], settings)
    model = _in_memory(trained.network, settings, configuration)
    # Kept, so that what is measured on held-out patients later (the uncertainty of an
    # ensemble or of dropout, a new metric) uses the same models and folds.
    save_model(
        model_path(out, settings.direction, configuration, settings.seed, fold),
        model.network,
        model.card,
    )
    evaluation = evaluate(model, test)
    figures = out / "figures" / _run_folder(settings.direction, configuration, settings.seed)
    for study in evaluation.studies:
        save_comparison(
            figures / f"{study.label}.png",
            f"{configuration} ({settings.direction}), {study.label} held out",
            *study.images,
            focus=study.focus,
        )
    return {
        "direction": settings.direction,
        "configuration": configuration,
        "seed": settings.seed,
        "fold": fold.number,
        "held_out": list(fold.held_out),
        "settings": asdict(settings),
        "train_seconds": round(trained.seconds, 1),
        "samples_per_second": round(trained.samples_per_second, 2),
        "final_loss": trained.history[-1]["loss"],
        "seconds": round(time.perf_counter() - started, 1),
        "evaluation": evaluation.report(),
    }


def _write_folds(out: Path, folds: list[Fold], paired: list[PairedVolume]) -> None:
    studies: dict[str, list[str]] = {}
    for item in paired:
        studies.setdefault(item.pair.patient, []).append(
            f"{item.pair.label} ({item.group.value}"
            + (", lesion mask" if item.lesions is not None and item.lesions.any() else "")
            + ")"
        )
    out.mkdir(parents=True, exist_ok=True)
    listing = {
        fold.name(): {patient: studies[patient] for patient in fold.held_out} for fold in folds
    }
    (out / "folds.json").write_text(json.dumps(listing, indent=1) + "\n")


def read_runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(out.glob("runs/*/*/*/*.json"))]


def summary(runs: list[dict[str, Any]], direction: str, configuration: str) -> dict[str, Any]:
    """Held-out scores of one configuration in one direction over its folds and seeds.

    ``overall``: predictor -> metric, the mean over seeds of the mean over patients (each
    patient scored by the fold that held it out). ``spread``: the standard deviation of
    the overall model scores over seeds, and of the per-fold model means over folds (each
    averaged over seeds). ``groups``: the same mean over the studies of each group.
    ``lesions``: each masked study's fidelity per predictor (mean over seeds) and their mean.
    ``spurious_foci``: the same for spurious foci, over every study whose record has them.
    ``overshoot``: how many held-out studies (of those measured, over all seeds) a node would
    hold for output beyond the model's learnt range, and the brightest peak.
    """
    mine = [
        run
        for run in runs
        if run["direction"] == direction and run["configuration"] == configuration
    ]
    if not mine:
        return {}
    seeds = sorted({run["seed"] for run in mine})
    by_seed = {seed: [run for run in mine if run["seed"] == seed] for seed in seeds}
    overall_per_seed = [_mean_over_patients(runs_of_seed) for runs_of_seed in by_seed.values()]
    overall = _mean_dicts(overall_per_seed)
    folds = sorted({run["fold"] for run in mine})
    fold_means = [
        _mean_dicts([_mean_over_patients([r]) for r in mine if r["fold"] == fold])["model"]
        for fold in folds
    ]
    studies = [study for run in mine for study in run["evaluation"]["studies"]]
    groups: dict[str, list[dict[str, Any]]] = {}
    for study in studies:
        groups.setdefault(study["group"], []).append(study["metrics"])
    lesions = _lesion_summary(studies)
    described, changes = CONFIGURATIONS[configuration]
    return {
        "protocol": (
            f"{len(folds)}-fold cross-validation by patient, {direction}, configuration "
            f"{configuration!r} ({described}), seeds {seeds}: {changes}; settings "
            f"{_settings_without_seed(mine[0]['settings'])}"
        ),
        "folds": {f"fold-{run['fold']}": run["held_out"] for run in by_seed[seeds[0]]},
        "seeds": seeds,
        "runs": len(mine),
        "complete": all(len(by_seed[seed]) == len(folds) for seed in seeds),
        "overall": overall,
        "spread": {
            "seeds": _std_dicts([o["model"] for o in overall_per_seed]),
            "folds": _std_dicts(fold_means),
        },
        "groups": {group: _mean_dicts(items) for group, items in groups.items()},
        "lesion_fidelity": lesions,
        "spurious_foci": _spurious_summary(studies),
        "overshoot": _overshoot_summary(studies),
        "patients": _mean_dicts_by_key([run["evaluation"]["patients"] for run in mine]),
        "train_seconds": float(np.mean([run["train_seconds"] for run in mine])),
    }


def _settings_without_seed(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in ("seed", "direction")}


def _mean_over_patients(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    patients = [p for run in runs for p in run["evaluation"]["patients"].values()]
    return _mean_dicts(patients)


def _mean_dicts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Element-wise mean of nested dicts of numbers with the same keys."""
    first = items[0]
    if not isinstance(first, dict):
        return float(np.mean(items))
    return {key: _mean_dicts([item[key] for item in items]) for key in first}


def _std_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.std([item[key] for item in items])) for key in items[0]}


def _mean_dicts_by_key(items: list[dict[str, Any]]) -> dict[str, Any]:
    """key -> the mean of that key's values over the dicts that have it."""
    collected: dict[str, list[Any]] = {}
    for item in items:
        for key, value in item.items():
            collected.setdefault(key, []).append(value)
    return {key: _mean_dicts(values) for key, values in collected.items()}


def _lesion_summary(studies: list[dict[str, Any]]) -> dict[str, Any]:
    per_study: dict[str, dict[str, list[float]]] = {}
    for study in studies:
        for predictor, value in (study.get("lesions") or {}).items():
            if value["fidelity"] is not None:
                per_study.setdefault(study["study"], {}).setdefault(predictor, []).append(
                    value["fidelity"]
                )
    if not per_study:
        return {}
    studies_mean = {
        study: {predictor: float(np.mean(v)) for predictor, v in by.items()}
        for study, by in per_study.items()
    }
    return {
        "mean": {
            predictor: float(np.mean([by[predictor] for by in studies_mean.values()]))
            for predictor in PREDICTORS
        },
        "minimum": {
            predictor: float(np.min([by[predictor] for by in studies_mean.values()]))
            for predictor in PREDICTORS
        },
        "studies": studies_mean,
    }


def _spurious_summary(studies: list[dict[str, Any]]) -> dict[str, Any]:
    """predictor -> count and volume_ml, the mean over studies of each study's mean over
    seeds; and the model's per study."""
    per_study: dict[str, list[dict[str, dict[str, float]]]] = {}
    for study in studies:
        if "spurious" in study:
            per_study.setdefault(study["study"], []).append(study["spurious"])
    if not per_study:
        return {}
    studies_mean = {study: _mean_dicts(values) for study, values in per_study.items()}
    return {
        "mean": _mean_dicts(list(studies_mean.values())),
        "studies": {study: by["model"] for study, by in studies_mean.items()},
    }


def _overshoot_summary(studies: list[dict[str, Any]]) -> dict[str, Any]:
    measured = [study["overshoot"] for study in studies if "overshoot" in study]
    if not measured:
        return {}
    limit = OutputSettings().hold_overshoot_above_ml
    return {
        "held": sum(value["volume_ml"] > limit for value in measured),
        "studies": len(measured),
        "peak": max(value["peak"] for value in measured),
    }


def tables(runs: list[dict[str, Any]], configurations: list[str], directions: list[str]) -> str:
    """Markdown, per direction: each configuration's held-out means with their spreads over
    folds and seeds, beside the floors; then the groups and the lesion fidelity."""
    lines = []
    for direction in directions:
        found = {c: summary(runs, direction, c) for c in configurations}
        found = {c: s for c, s in found.items() if s}
        if not found:
            continue
        first = next(iter(found.values()))
        lines += [
            f"### {direction}: held-out patients (mean over patients; ± over folds; ± over seeds)",
            "",
            "| predictor | seeds | "
            + " | ".join(TABLE_METRICS)
            + " | lesion fidelity | spurious foci (mL) | held: beyond range (peak) |",
            "|---|---|" + "---|" * (len(TABLE_METRICS) + 3),
        ]
        for floor in ("input", "inverted"):
            values = first["overall"][floor]
            fidelity = first["lesion_fidelity"].get("mean", {}).get(floor)
            lines.append(
                f"| floor: {floor} | | "
                + " | ".join(f"{values[m]:.3f}" for m in TABLE_METRICS)
                + f" | {_number(fidelity)} | {_foci(first, floor)} | |"
            )
        for configuration, result in found.items():
            values = result["overall"]["model"]
            spread = result["spread"]
            cells = [
                f"{values[m]:.3f} ±{spread['folds'][m]:.3f} ±{spread['seeds'][m]:.3f}"
                for m in TABLE_METRICS
            ]
            fidelity = result["lesion_fidelity"]
            lesion = (
                f"{fidelity['mean']['model']:.2f} (min {fidelity['minimum']['model']:.2f})"
                if fidelity
                else "-"
            )
            complete = "" if result["complete"] else " (incomplete)"
            lines.append(
                f"| {configuration}{complete} | {len(result['seeds'])} | "
                + " | ".join(cells)
                + f" | {lesion} | {_foci(result, 'model')} | {_held(result)} |"
            )
        lines += ["", f"{direction} by group (PSNR / SSIM / corr inside the head):", ""]
        groups = sorted({g for result in found.values() for g in result["groups"]})
        lines += ["| predictor | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        rows = [("floor: inverted", first, "inverted")] + [
            (c, r, "model") for c, r in found.items()
        ]
        for name, result, predictor in rows:
            cells = []
            for group in groups:
                values = result["groups"].get(group, {}).get(predictor)
                cells.append(
                    "-"
                    if values is None
                    else f"{values['psnr_head']:.2f} / {values['ssim_head']:.3f} / "
                    f"{values['corr_head']:.3f}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        studies = sorted(
            {s for r in found.values() for s in r["lesion_fidelity"].get("studies", {})}
        )
        if studies:
            lines += ["", f"{direction} lesion fidelity per study:", ""]
            lines += [
                "| predictor | " + " | ".join(studies) + " |",
                "|---|" + "---|" * len(studies),
            ]
            for name, result, predictor in rows:
                by_study = result["lesion_fidelity"].get("studies", {})
                lines.append(
                    f"| {name} | "
                    + " | ".join(
                        _number(by_study.get(study, {}).get(predictor)) for study in studies
                    )
                    + " |"
                )
        lines.append("")
    return "\n".join(lines)


def _foci(result: dict[str, Any], predictor: str) -> str:
    """A predictor's spurious foci in a table cell: mean count per study (volume)."""
    foci = result["spurious_foci"].get("mean", {}).get(predictor)
    if foci is None:
        return "-"
    return f"{foci['count']:.0f} ({foci['volume_ml']:.1f})"


def _held(result: dict[str, Any]) -> str:
    """Studies a node would hold for output beyond the learnt range, of those measured."""
    overshoot = result.get("overshoot")
    if not overshoot:
        return "-"
    return f"{overshoot['held']} of {overshoot['studies']} ({overshoot['peak']:.2f})"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def write_summaries(out: Path, configurations: list[str]) -> list[dict[str, Any]]:
    runs = read_runs(out)
    directions = [direction.value for direction in Direction]
    for direction in directions:
        for configuration in configurations:
            found = summary(runs, direction, configuration)
            if found:
                path = out / f"{configuration}-{direction}.json"
                path.write_text(json.dumps(found, indent=1) + "\n")
    (out / "tables.md").write_text(tables(runs, configurations, directions))
    return runs


def attach_summary(model_path: Path, summary_path: Path) -> ModelCard:
    """Put an ablation summary on a model's card as its ``reference`` held-out metrics.

    For a model trained before its configuration's ablation finished (``dicomnode train
    --reference-metrics`` does the same at training time). The weights, and so the
    checksum, stay as they are; the readable card beside a registry model is rewritten too.
    """
    loaded = load_model(model_path)
    card = loaded.card
    card.metrics["reference"] = load_reference_metrics(summary_path)
    card = save_model(model_path, loaded.network, card)
    readable = model_path.with_suffix(".json")
    if readable.is_file():
        ModelRegistry(model_path.parent.parent).write_card(card.name, card)
    return card


def _in_memory(network: torch.nn.Module, settings: TrainSettings, name: str) -> LoadedModel:
    card = ModelCard.from_settings(name, "ablation", settings)
    card.checksum = weights_checksum(network.state_dict())
    return LoadedModel(network.cpu().eval(), card, Path("(in memory)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="*", help="folders of paired studies")
    parser.add_argument("--out", type=Path, default=Path("var/kfold"))
    parser.add_argument(
        "--lesions", type=Path, nargs="+", help="folders of lesion masks (.npz), expert first"
    )
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGURATIONS), choices=CONFIGURATIONS
    )
    directions = [direction.value for direction in Direction]
    parser.add_argument("--directions", nargs="+", default=directions, choices=directions)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--fold-count", type=int, default=DEFAULT_FOLDS)
    parser.add_argument("--folds", nargs="+", type=int, help="run only these folds (from 1)")
    parser.add_argument("--base-width", type=int, default=default_arguments()["base_width"])
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=TrainSettings.steps_per_epoch)
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--tables", action="store_true", help="only write the summaries and tables of OUT"
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="train nothing; score the kept models of finished runs again where their "
        "records lack a metric",
    )
    parser.add_argument(
        "--attach",
        type=Path,
        metavar="MODEL",
        help="only put OUT/<config>-<direction>.json (one --configs, the model's direction) "
        "on MODEL's card as its reference held-out metrics",
    )
    args = parser.parse_args(argv)
    if args.attach:
        direction = load_model(args.attach).card.direction
        card = attach_summary(args.attach, args.out / f"{args.configs[0]}-{direction}.json")
        print(f"{args.attach}: reference metrics of {args.configs[0]} attached ({card.name})")
        return 0
    if not args.tables:
        if not args.data:
            parser.error("give the folders of paired studies")
        if args.threads:
            torch.set_num_threads(args.threads)
        base = TrainSettings(
            direction=directions[0],
            arguments={**shipped_arguments(), "base_width": args.base_width},
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
        )
        run_ablation(
            args.data,
            args.out,
            base,
            args.configs,
            args.directions,
            args.seeds,
            args.fold_count,
            args.folds,
            LesionMasks.load(*args.lesions) if args.lesions else None,
            args.rescore,
        )
    runs = write_summaries(args.out, args.configs)
    print(tables(runs, args.configs, directions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
