"""The ML engineer's subcommands of `dicomnode`: train, evaluate, models.

``add_commands`` adds them to the node's command line (node/cli.py). They parse, call the
library (``train.workflow``, ``train.evaluate``, ``pipeline.model.registry``) and print.
The registry is ``--registry`` when given, else ``[models] registry`` of config.toml, read
by ``node.config`` as for the node (relative paths resolve against the file's folder),
else its default beside config.toml when there is no such file.

node/cli.py builds this parser only when one of these commands is run, and torch,
matplotlib and the training modules are imported by the commands that use them: the
admin's quick commands do not pay a second or two of imports for them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import folder_problem, load_config_or_defaults
from pipeline.dicom.contrast import Direction
from pipeline.model.preprocess import Normalization

if TYPE_CHECKING:
    from train.trainer import TrainSettings


def add_commands(subparsers: Any, add_global_options: Callable[..., None]) -> None:
    """Add ``train``, ``evaluate`` and ``models`` to an argparse subparsers object, each
    with the node's ``add_global_options`` (--config, --log-format)."""
    # torch comes with them: the CLI builds these commands only when one of them is run.
    from train.recipe import Recipe
    from train.trainer import Loss, Precision, TrainSettings

    def command(name: str, run: Any, help: str) -> argparse.ArgumentParser:
        sub = subparsers.add_parser(name, help=help, description=help)
        add_global_options(sub, defaults=False)
        sub.set_defaults(run=run)
        return sub

    train = command("train", _train, "train a model on paired T1/T2 studies and register it")
    train.add_argument("data", type=Path, nargs="*", metavar="DATA", help="folders of studies")
    train.add_argument(
        "--harvested",
        action="store_true",
        help="also the pairs the node harvested ([harvest]), patients by salted pseudonym",
    )
    train.add_argument("--direction", choices=[d.value for d in Direction], required=True)
    train.add_argument("--out", type=Path, help="also write the model file here")
    train.add_argument("--name", help="registry name (default: the direction)")
    train.add_argument("--registry", type=Path, help="registry folder (default: from config)")
    train.add_argument("--no-registry", action="store_true", help="write --out only")
    train.add_argument(
        "--force", action="store_true", help="activate even if not better than the active one"
    )
    train.add_argument(
        "--holdout",
        action="append",
        default=[],
        metavar="PATIENT",
        help="hold this patient out (PatientID or its pseudonym); repeatable",
    )
    train.add_argument(
        "--validation-fraction",
        type=float,
        default=0.2,
        help="fraction of patients held out when no --holdout is given (default 0.2; 0: none)",
    )
    # The recipe's options have no argparse default: one left out keeps the value of the
    # recipe it starts from (--recipe). Their help shows TrainSettings' own defaults.
    train.add_argument(
        "--recipe",
        choices=[recipe.value for recipe in Recipe],
        default=Recipe.DEFAULTS.value,
        help="what the options left out keep: defaults, the v5 recipe (the defaults shown "
        "here); active, the recipe of the registry's active model of this name as its card "
        "records it, to retrain the shipped models on new data (default defaults)",
    )
    train.add_argument("--epochs", type=int, help=f"(default {TrainSettings.epochs})")
    train.add_argument(
        "--steps-per-epoch", type=int, help=f"(default {TrainSettings.steps_per_epoch})"
    )
    train.add_argument("--batch-size", type=int, help=f"(default {TrainSettings.batch_size})")
    train.add_argument(
        "--crop", type=int, help=f"square training crop (pixels) (default {TrainSettings.crop})"
    )
    train.add_argument(
        "--learning-rate", type=float, help=f"(default {TrainSettings.learning_rate})"
    )
    train.add_argument(
        "--loss",
        choices=[loss.value for loss in Loss],
        help=f"mse (the paper's), l1, either + (1 - SSIM) (default {TrainSettings.loss})",
    )
    train.add_argument(
        "--precision",
        choices=[precision.value for precision in Precision],
        help="of the convolutions in training: bfloat16 is faster where the CPU or GPU has "
        f"it; weights and inference stay float32 (default {TrainSettings.precision})",
    )
    train.add_argument(
        "--normalization",
        choices=[normalization.value for normalization in Normalization],
        help="of the input: percentile-volume, scale-volume, median-volume or minmax-slice "
        f"(the paper's) (default {TrainSettings.normalization})",
    )
    train.add_argument(
        "--target-normalization",
        choices=[normalization.value for normalization in Normalization],
        help="of the targets, i.e. the space the model's output is in "
        f"(default {TrainSettings.target_normalization})",
    )
    train.add_argument(
        "--pixel-spacing",
        dest="pixel_spacing_mm",
        type=float,
        metavar="MM",
        help="in-plane pixel size the model learns at: slices far from it are resampled, in "
        f"training and at inference (default {TrainSettings.pixel_spacing_mm})",
    )
    shipped = " (default: UNet's own)"
    train.add_argument("--base-width", type=int, help="channels of the first level" + shipped)
    train.add_argument("--depth", type=int, help="number of poolings" + shipped)
    train.add_argument("--dropout", type=float, help="dropout probability" + shipped)
    train.add_argument("--norm", help="batch, instance or none" + shipped)
    train.add_argument(
        "--upsampling",
        help="transpose (the paper's), transpose-icnr, bilinear or nearest-conv" + shipped,
    )
    train.add_argument(
        "--input-shortcut",
        action=argparse.BooleanOptionalAction,
        help="add a learnt affine map of the input image to the output" + shipped,
    )
    train.add_argument(
        "--gradient-channels",
        action=argparse.BooleanOptionalAction,
        help="the Sobel channels beside the slice (--no-gradient-channels: the plain U-Net's "
        "input; default on)",
    )
    train.add_argument(
        "--neighbours",
        type=float,
        metavar="MM",
        help="also show the network the slices MM below and above each slice (2.5-D; 0: "
        f"each slice alone; default {TrainSettings.neighbour_distance_mm})",
    )
    train.add_argument(
        "--lesion-painting",
        type=float,
        metavar="P",
        help="probability that a training crop gets lesions painted in "
        f"(default {TrainSettings.lesion_painting})",
    )
    train.add_argument(
        "--painted-tumour-share",
        type=float,
        metavar="P",
        help="share of paintings that are one large lesion with oedema; the others are "
        f"several small plaques (default {TrainSettings.painted_tumour_share})",
    )
    train.add_argument(
        "--lesion-weight",
        type=float,
        help=f"extra loss weight of painted lesion pixels (default {TrainSettings.lesion_weight})",
    )
    train.add_argument(
        "--lesion-oversampling",
        type=float,
        metavar="P",
        help="probability that a crop is centred on a masked lesion (with --lesions; "
        f"default {TrainSettings.lesion_oversampling})",
    )
    train.add_argument(
        "--thick-slices",
        type=float,
        metavar="P",
        help="probability that a thin-slice study is shown as thick slabs "
        f"(default {TrainSettings.thick_slices})",
    )
    train.add_argument(
        "--lesions",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="folders of lesion masks (.npz, by series UID): oversampled in training, scored "
        "on held-out patients",
    )
    train.add_argument(
        "--skip-connections",
        action=argparse.BooleanOptionalAction,
        help="the U-Net's skips (--no-skip-connections: the encoder-decoder baseline; default on)",
    )
    train.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, help="augment crops (default on)"
    )
    train.add_argument(
        "--no-register",
        action="store_true",
        help="trust the headers: no rigid refinement of pairs on different grids",
    )
    train.add_argument("--seed", type=int, help=f"(default {TrainSettings.seed})")
    train.add_argument(
        "--checkpoint", type=Path, help="default: var/train/NAME.ckpt beside config.toml"
    )
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    train.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    train.add_argument(
        "--reference-metrics",
        type=Path,
        help="JSON of held-out metrics measured elsewhere (the ablation) to put on the card",
    )

    evaluation = command(
        "evaluate", _evaluate, "score a model on paired studies, beside the trivial floors"
    )
    evaluation.add_argument(
        "model", metavar="MODEL", help="model file, or registry NAME (active) or NAME:VERSION"
    )
    evaluation.add_argument("data", type=Path, nargs="+", metavar="DATA")
    evaluation.add_argument("--registry", type=Path, help="registry folder (default: from config)")
    evaluation.add_argument(
        "--report",
        type=Path,
        help="folder for JSON and figures (default: var/evaluation beside config.toml)",
    )
    evaluation.add_argument(
        "--no-register",
        action="store_true",
        help="trust the headers: no rigid refinement of pairs on different grids",
    )
    evaluation.add_argument(
        "--lesions",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="folders of lesion masks (.npz, by series UID): scores lesion fidelity",
    )

    models = command("models", _list, "list the registered models, or activate a version")
    actions = models.add_subparsers(metavar="ACTION")
    listing = actions.add_parser("list", help="versions, metrics, checksums, which is active")
    add_global_options(listing, defaults=False)
    listing.set_defaults(run=_list)
    activate = actions.add_parser("activate", help="make VERSION the one jobs use (rollback)")
    activate.add_argument("name", metavar="NAME")
    activate.add_argument("version", metavar="VERSION")
    add_global_options(activate, defaults=False)
    activate.set_defaults(run=_activate)
    for parser in (models, listing, activate):
        parser.add_argument("--registry", type=Path, help="registry folder (default: from config)")


def registry_root(config: Path, override: Path | None) -> Path:
    """The registry folder: ``override``, else config.toml's ``[models] registry``, read
    as the node reads it, else (no such file) its default beside config.toml."""
    if override is not None:
        return override
    return load_config_or_defaults(config).models.registry


# TrainSettings' fields that an option of `dicomnode train` sets under the same name;
# the network's arguments and the neighbours are set apart.
RECIPE_OPTIONS = (
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "crop",
    "learning_rate",
    "loss",
    "precision",
    "normalization",
    "target_normalization",
    "pixel_spacing_mm",
    "gradient_channels",
    "augment",
    "lesion_painting",
    "painted_tumour_share",
    "lesion_weight",
    "lesion_oversampling",
    "thick_slices",
    "seed",
)
NETWORK_OPTIONS = (
    "base_width",
    "depth",
    "dropout",
    "norm",
    "upsampling",
    "input_shortcut",
    "skip_connections",
)


def train_settings(args: argparse.Namespace, base: TrainSettings | None = None) -> TrainSettings:
    """The recipe the command line asks for: ``base`` (the library's defaults when None)
    with the options given. ValueError names a setting that cannot train."""
    from pipeline.model.preprocess import input_channels
    from train.trainer import TrainSettings

    base = base or TrainSettings(direction=args.direction)
    given = {key: getattr(args, key) for key in RECIPE_OPTIONS if getattr(args, key) is not None}
    # --neighbours 0: each slice alone.
    neighbours = (
        base.neighbour_distance_mm if args.neighbours is None else (args.neighbours or None)
    )
    gradients = given.get("gradient_channels", base.gradient_channels)
    arguments = {
        **base.arguments,
        **{key: getattr(args, key) for key in NETWORK_OPTIONS if getattr(args, key) is not None},
        "in_channels": input_channels(gradients, neighbours is not None),
    }
    return replace(
        base,
        direction=args.direction,
        neighbour_distance_mm=neighbours,
        arguments=arguments,
        **given,
    )


def _train(args: argparse.Namespace) -> int:
    from pipeline.model.card import ModelFileError
    from pipeline.model.inference import use_threads
    from pipeline.model.registry import ModelRegistry, RegistryError
    from train.lesions import LesionMasks
    from train.recipe import Recipe, active_recipe
    from train.trainer import console_progress
    from train.workflow import TrainRequest, load_reference_metrics, run_training

    if args.threads:
        use_threads(args.threads)
    registry = (
        None if args.no_registry else ModelRegistry(registry_root(args.config, args.registry))
    )
    if registry is None and args.out is None:
        print("--no-registry needs --out: the model would be written nowhere", file=sys.stderr)
        return 2
    name = args.name or args.direction
    recipe = None
    try:
        if Recipe(args.recipe) is Recipe.ACTIVE:
            if registry is None:
                raise ValueError("--recipe active needs the registry (not --no-registry)")
            recipe = active_recipe(registry, name)
            print(f"train: {recipe}, with the options given")
        settings = train_settings(args, recipe.settings if recipe else None)
        lesions = LesionMasks.load(*args.lesions) if args.lesions else None
        if args.reference_metrics:
            reference = load_reference_metrics(args.reference_metrics)
        else:  # the active recipe's k-fold figures, while the options given leave it as it is
            reference = recipe.reference_for(settings) if recipe else None
    except (ValueError, TypeError, OSError) as error:
        print(f"train: {error}", file=sys.stderr)
        return 2
    data, salt = list(args.data), ""
    if args.harvested:
        from pipeline.harvest import harvest_root, node_salt

        storage = load_config_or_defaults(args.config).node.storage
        if not harvest_root(storage).is_dir():
            print(f"train: --harvested: no harvest under {storage}", file=sys.stderr)
            return 2
        data.append(harvest_root(storage))
        salt = node_salt(storage)
    if not data:
        print("train: give folders of studies, or --harvested", file=sys.stderr)
        return 2
    # var/ is where the node keeps its working state, and it is never committed.
    checkpoint = args.checkpoint or args.config.resolve().parent / "var" / "train" / f"{name}.ckpt"
    folders = {
        "--out": args.out.parent if args.out else None,
        "--checkpoint": checkpoint.parent,
        "the registry": registry.root / name if registry else None,
    }
    problems = [
        problem
        for option, folder in folders.items()
        if folder is not None and (problem := folder_problem(option, folder))
    ]
    problems += (
        [f"--out = '{args.out}' is a folder; give a file"] if args.out and args.out.is_dir() else []
    )
    if problems:  # found now, not after hours of training
        print("train: " + "; ".join(problems), file=sys.stderr)
        return 2
    request = TrainRequest(
        data=data,
        salt=salt,
        settings=settings,
        name=name,
        holdout=args.holdout,
        validation_fraction=args.validation_fraction,
        out=args.out,
        registry=registry,
        force=args.force,
        resume=args.resume,
        checkpoint=checkpoint,
        command=shlex.join(["dicomnode", *sys.argv[1:]]),
        register=not args.no_register,
        lesions=lesions,
        reference_metrics=reference,
    )
    try:
        outcome = run_training(request, progress=console_progress)
    except (ValueError, ModelFileError, RegistryError) as error:
        print(f"train: {error}", file=sys.stderr)
        return 1
    print(
        f"trained {outcome.card.name} {outcome.card.version} in {outcome.card.training['seconds']}"
        f" s ({outcome.card.training['samples_per_second']} samples/s); "
        + ("written to " + ", ".join(map(str, outcome.written)) if outcome.written else "")
    )
    if outcome.activated:
        _audit_activation(args, outcome.card.name, outcome.card.version)
    return 0 if outcome.shipped else 1


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.model.card import ModelFileError, load_model
    from pipeline.model.inference import pick_device
    from pipeline.model.registry import ModelRegistry, RegistryError
    from train.evaluate import evaluate_folders
    from train.lesions import LesionMaskError, LesionMasks

    try:
        registry = ModelRegistry(registry_root(args.config, args.registry))
        model = load_model(registry.find(args.model), pick_device())
        lesions = LesionMasks.load(*args.lesions) if args.lesions else None
    except (ModelFileError, RegistryError, LesionMaskError) as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 1
    # var/ is where the node keeps its working state, and it is never committed.
    report = args.report or args.config.resolve().parent / "var" / "evaluation"
    problem = folder_problem("--report", report)
    if problem:  # found now, not after the scoring
        print(f"evaluate: {problem}", file=sys.stderr)
        return 1
    result = evaluate_folders(
        model, args.data, report, register=not args.no_register, lesions=lesions
    )
    if result.path is None:
        print("evaluate: no pairs and no unpaired source series found", file=sys.stderr)
        return 1
    print(f"report: {result.path}")
    return 1 if result.collapsed else 0


def _list(args: argparse.Namespace) -> int:
    from pipeline.model.card import ModelFileError
    from pipeline.model.lesionfidelity import describe_lesion_fidelity
    from pipeline.model.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(registry_root(args.config, args.registry))
    if not registry.root.is_dir():
        what = "is a file, not a folder" if registry.root.exists() else "does not exist"
        print(f"models: the model registry {registry.root} {what}", file=sys.stderr)
        return 1
    names = registry.names()
    if not names:
        print(f"no models in {registry.root}")
        return 0
    for name in names:
        try:
            active = registry.active_version(name)
        except RegistryError:
            active = None
        for version in registry.versions(name):
            try:
                card = registry.read_card(name, version)
            except ModelFileError as error:
                card = {"direction": f"unreadable: {error}"}
            marker = "*" if version == active else " "
            print(
                f"{marker} {name} {version}  {card.get('direction', '?')}  "
                f"created {card.get('created', '?')}  sha256:{card.get('checksum', '')[:12]}"
            )
            for line in _metrics_lines(card.get("metrics", {})):
                print(f"      {line}")
            if "metrics" in card:  # an unreadable card says so above, not "not measured"
                print(f"      {describe_lesion_fidelity(card['metrics'])}")
    print("(* = active)")
    print(f"All models: {RESEARCH_USE}.")
    return 0


def _activate(args: argparse.Namespace) -> int:
    from pipeline.model.card import ModelFileError
    from pipeline.model.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(registry_root(args.config, args.registry))
    try:
        registry.activate(args.name, args.version)
    except (RegistryError, ModelFileError) as error:
        print(f"models activate: {error}", file=sys.stderr)
        return 1
    print(f"{args.name} {args.version} is now active")
    _audit_activation(args, args.name, args.version)
    return 0


def _audit_activation(args: argparse.Namespace, name: str, version: str) -> None:
    """Into the audit trail of the node whose registry this is, where one is configured."""
    if getattr(args, "registry", None) is not None or not args.config.is_file():
        return
    from sqlalchemy.exc import SQLAlchemyError

    from node.config import load_config
    from pipeline.state.audit import cli_origin, record_activation
    from pipeline.state.db import open_database
    from pipeline.state.schema import SchemaError

    database = load_config(args.config).node.database
    try:
        record_activation(open_database(database), name, version, cli_origin())
    except (SQLAlchemyError, SchemaError, ImportError) as error:
        # The activation itself stands; only its record failed.
        reason = str(error).splitlines()[0]
        print(f"(not in the node's audit trail: {reason})", file=sys.stderr)


# Which figures a card's metrics are, in words: only held-out patients say how a model does
# on people it never saw.
_FIGURES = {
    "held_out": "held out",
    "reference": "held out (k-fold, its recipe)",
    "training_data_only": "on its own training data, NOT held out",
}
RESEARCH_USE = (
    "research use, not for diagnosis (until this site's own monitor says otherwise: "
    "dicomnode quality)"
)


def _metrics_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    for key, label in _FIGURES.items():
        overall = (metrics.get(key) or {}).get("overall") or {}
        if "model" in overall:
            model, floor = overall["model"], overall.get("inverted", {})
            nan = float("nan")
            lines.append(
                f"{label}: PSNR head {model['psnr_head']:.2f} dB, SSIM head "
                f"{model['ssim_head']:.3f} (inverted input: {floor.get('psnr_head', nan):.2f} dB, "
                f"{floor.get('ssim_head', nan):.3f})"
            )
    if not any(key in metrics for key in ("held_out", "reference")):
        lines.append(
            "held out: no figures on the card (docs/ablation.md has its recipe's; "
            "python -m train.ablation --attach puts them there)"
        )
    return lines
