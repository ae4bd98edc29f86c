"""The ablation of docs/ablation.md, reproducible with one command.

Leave one patient out over the paired patients, both directions, the paper's model against
its two baselines (plain U-Net without gradient channels; encoder-decoder without skips)
and candidate improvements, every model scored on its held-out patient through the node's
inference path, beside the trivial floors::

    .venv/bin/python -m train.ablation ../shared/data/mr-brain --out var/ablation

Results go to OUT/results-<direction>.json as each run finishes (a rerun skips the runs
already there, so an interrupted ablation continues), the tables to OUT/tables.md, one
summary per configuration and direction to OUT/<config>-<direction>.json (the held-out metrics that
``dicomnode train --reference-metrics`` puts on a card) and figures of the held-out native
study to docs/figures/. The defaults fit 2 shared CPU cores; on a GPU raise --steps and
--base-width.
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

from pipeline.modelfile import LoadedModel, ModelCard, load_model, save_model, weights_checksum
from pipeline.registry import ModelRegistry
from pipeline.routing import Direction
from pipeline.unet import DEFAULT_ARGUMENTS
from train.dataset import TrainingStudy, prepare_study
from train.evaluate import PREDICTORS, Evaluation, evaluate
from train.figures import save_comparison
from train.pairs import PairedVolume, find_pairs, load_pair
from train.trainer import TrainSettings, train_network
from train.workflow import load_reference_metrics

# name -> (what it is, its settings beyond the run's size). Every entry names its
# normalisation and loss, so that no configuration depends on TrainSettings' defaults.
# target_normalization None: the targets are normalised like the input.
_PAPER = {"normalization": "minmax-slice", "target_normalization": None, "loss": "mse"}
# The recipe of the v3 models, which the upsampling, shortcut and normalisation variants
# were measured against.
_V3 = {"normalization": "percentile-volume", "target_normalization": None, "loss": "mse+ssim"}
CONFIGURATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper": ("the paper's U-Net: image + Sobel x/y, per-slice min-max, MSE", _PAPER),
    "plain-unet": ("baseline: U-Net without gradient channels", {**_PAPER, "in_channels": 1}),
    "encoder-decoder": ("baseline: no skip connections", {**_PAPER, "skip_connections": False}),
    "percentile": (
        "paper + per-volume percentile normalisation",
        {**_PAPER, "normalization": "percentile-volume"},
    ),
    "percentile-ssim": (
        "paper + percentile normalisation + MSE/SSIM loss (v3's recipe)",
        _V3,
    ),
    "bilinear-ssim": (
        "v3's recipe with bilinear upsampling instead of transposed convolutions",
        {**_V3, "upsampling": "bilinear"},
    ),
    "icnr-ssim": (
        "v3's recipe with its transposed convolutions initialised as nearest upsampling",
        {**_V3, "upsampling": "transpose-icnr"},
    ),
    "resize-ssim": (
        "v3's recipe with resize-convolutions (nearest, then 3x3) instead of transposed",
        {**_V3, "upsampling": "nearest-conv"},
    ),
    "shortcut-ssim": (
        "v3's recipe plus a learnt affine map of the input added to the output",
        {**_V3, "input_shortcut": True},
    ),
    "median-ssim": (
        "v3's recipe with each volume divided by twice its foreground's median",
        {**_V3, "normalization": "median-volume"},
    ),
    "median-input-ssim": (
        "v3's recipe with the input divided by twice its foreground's median (the shipped, v4)",
        {**_V3, "normalization": "median-volume", "target_normalization": "percentile-volume"},
    ),
    "scale-ssim": (
        "paper + per-volume scaling without offset + MSE/SSIM loss",
        {**_V3, "normalization": "scale-volume"},
    ),
}
TABLE_METRICS = ("mse_slice", "mae_slice", "psnr_slice", "ssim_slice", "psnr_head", "ssim_head")


def settings_for(configuration: str, base: TrainSettings) -> TrainSettings:
    """``base`` (the run's size, seed and budget) changed as ``configuration`` says."""
    changes = dict(CONFIGURATIONS[configuration][1])
    arguments = dict(base.arguments)
    for key in ("in_channels", "skip_connections", "upsampling", "input_shortcut"):
        if key in changes:
            arguments[key] = changes.pop(key)
    return replace(base, arguments=arguments, **changes)


def run_ablation(
    data: list[Path],
    out: Path,
    figures: Path,
    base: TrainSettings,
    configurations: list[str],
    directions: list[str],
) -> dict[str, Any]:
    """Run every (direction, held-out patient, configuration) not yet in OUT's results."""
    results: dict[str, Any] = {"runs": _read_runs(out)}
    results["protocol"] = {
        "split": "leave one patient out (all studies of the patient held out together)",
        "base_settings": asdict(base),
        "torch_threads": torch.get_num_threads(),
    }
    search = find_pairs(data)
    patients = sorted({pair.patient for pair in search.pairs})
    for direction in directions:
        paired = [
            load_pair(pair, direction, pixel_spacing_mm=base.pixel_spacing_mm)
            for pair in search.pairs
        ]
        paired = [item for item in paired if len(item.slices)]
        prepared: dict[tuple[str, str | None], list[TrainingStudy]] = {}
        for held_out in patients:
            for configuration in configurations:
                key = f"{direction}/{held_out}/{configuration}"
                if key in results["runs"]:
                    continue
                settings = replace(settings_for(configuration, base), direction=direction)
                normalizations = settings.normalization, settings.target_normalization
                if normalizations not in prepared:
                    prepared[normalizations] = [
                        prepare_study(item, *normalizations) for item in paired
                    ]
                studies = prepared[normalizations]
                training = [s for s in studies if s.patient != held_out]
                test = [item for item in paired if item.pair.patient == held_out]
                print(f"{key}: training on {len(training)} studies", file=sys.stderr)
                started = time.perf_counter()
                trained = train_network(training, [], settings)
                evaluation = evaluate(_in_memory(trained.network, settings, configuration), test)
                results["runs"][key] = {
                    "train_seconds": round(trained.seconds, 1),
                    "samples_per_second": round(trained.samples_per_second, 2),
                    "final_loss": trained.history[-1]["loss"],
                    "seconds": round(time.perf_counter() - started, 1),
                    "patient": held_out,
                    "studies": [s.label for s in evaluation.studies],
                    "overall": evaluation.overall(),
                    "collapse": [s.collapse for s in evaluation.studies],
                }
                _figure(evaluation, test, figures, direction, configuration)
                _write_runs(out, direction, results)
    # Another process may have run the other direction into OUT meanwhile: tabulate all.
    everything = {**results, "runs": {**_read_runs(out), **results["runs"]}}
    every_direction = [direction.value for direction in Direction]
    _summaries(everything, out, configurations, every_direction)
    (out / "tables.md").write_text(tables(everything, configurations, every_direction))
    return everything


def _read_runs(out: Path) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for path in sorted(out.glob("results-*.json")):
        runs.update(json.loads(path.read_text())["runs"])
    return runs


def _write_runs(out: Path, direction: str, results: dict[str, Any]) -> None:
    # One file per direction, so that both directions can run at once in two processes.
    runs = {k: v for k, v in results["runs"].items() if k.startswith(f"{direction}/")}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results-{direction}.json"
    path.write_text(json.dumps({"protocol": results["protocol"], "runs": runs}, indent=1) + "\n")


def summary(results: dict[str, Any], direction: str, configuration: str) -> dict[str, Any]:
    """Mean over held-out patients of each predictor's metrics, with the per-patient values."""
    runs = {
        run["patient"]: run["overall"]
        for key, run in results["runs"].items()
        if key.startswith(f"{direction}/") and key.endswith(f"/{configuration}")
    }
    if not runs:
        return {}
    overall = {
        predictor: {
            metric: float(np.mean([r[predictor][metric] for r in runs.values()]))
            for metric in next(iter(runs.values()))[predictor]
        }
        for predictor in PREDICTORS
    }
    described, changes = CONFIGURATIONS[configuration]
    # The run's base settings without what the configuration sets itself, so that nothing
    # on a card reads as the opposite of what was trained.
    base = dict(results["protocol"]["base_settings"])
    if "arguments" in base:
        network = base["arguments"]
        base["arguments"] = {**network, **{k: v for k, v in changes.items() if k in network}}
    base = {k: v for k, v in base.items() if k not in changes and k != "direction"}
    return {
        "protocol": (
            f"leave-one-patient-out ablation, {direction}, configuration {configuration!r} "
            f"({described}): {changes}, other settings {base}"
        ),
        "overall": overall,
        "patients": runs,
    }


def tables(results: dict[str, Any], configurations: list[str], directions: list[str]) -> str:
    """Markdown: per direction, each configuration's held-out mean beside the floors."""
    lines = []
    for direction in directions:
        lines += [
            f"### {direction}: held-out patients, mean of {len(_patients(results, direction))}",
            "",
            "| predictor | " + " | ".join(TABLE_METRICS) + " |",
            "|---|" + "---|" * len(TABLE_METRICS),
        ]
        floors_shown = False
        for configuration in configurations:
            found = summary(results, direction, configuration)
            if not found:
                continue
            if not floors_shown:
                for floor in ("input", "inverted"):
                    values = found["overall"][floor]
                    lines.append(
                        f"| floor: {floor} | "
                        + " | ".join(f"{values[m]:.4f}" for m in TABLE_METRICS)
                        + " |"
                    )
                floors_shown = True
            values = found["overall"]["model"]
            lines.append(
                f"| {configuration} | "
                + " | ".join(f"{values[m]:.4f}" for m in TABLE_METRICS)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def _patients(results: dict[str, Any], direction: str) -> set[str]:
    return {run["patient"] for key, run in results["runs"].items() if key.startswith(direction)}


def _summaries(
    results: dict[str, Any], out: Path, configurations: list[str], directions: list[str]
) -> None:
    for direction in directions:
        for configuration in configurations:
            found = summary(results, direction, configuration)
            if found:
                path = out / f"{configuration}-{direction}.json"
                path.write_text(json.dumps(found, indent=1) + "\n")


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
    card = ModelCard(
        name=name,
        version="ablation",
        direction=settings.direction,
        arguments=settings.arguments,
        normalization=settings.normalization,
        target_normalization=settings.target_normalization,
        pixel_spacing_mm=settings.pixel_spacing_mm,
        gradient_channels=settings.gradient_channels,
        checksum=weights_checksum(network.state_dict()),
    )
    return LoadedModel(network.cpu().eval(), card, Path("(in memory)"))


def _figure(
    evaluation: Evaluation,
    test: list[PairedVolume],
    folder: Path,
    direction: str,
    configuration: str,
) -> None:
    # The native study is the one that looks like what a hospital sends (skull, thick
    # oblique slices): its held-out fold is the one worth looking at.
    for study in evaluation.studies:
        if study.label.endswith("native"):
            save_comparison(
                folder / f"ablation-{direction}-{configuration}-{study.label}.png",
                f"{configuration} ({direction}), {study.label} held out",
                *study.images,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, nargs="*", help="folders of paired studies")
    parser.add_argument("--out", type=Path, default=Path("var/ablation"))
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"))
    parser.add_argument(
        "--configs", nargs="+", default=list(CONFIGURATIONS), choices=CONFIGURATIONS
    )
    directions = [direction.value for direction in Direction]
    parser.add_argument("--directions", nargs="+", default=directions, choices=directions)
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=DEFAULT_ARGUMENTS["depth"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
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
    if not args.data:
        parser.error("give the folders of paired studies")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = TrainSettings(
        direction=directions[0],
        arguments={**DEFAULT_ARGUMENTS, "base_width": args.base_width, "depth": args.depth},
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        crop=args.crop,
        seed=args.seed,
    )
    results = run_ablation(args.data, args.out, args.figures, base, args.configs, args.directions)
    print(tables(results, args.configs, args.directions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
