"""From folders of paired studies to a model file with its card, and into the registry.

The one path that `dicomnode train` and the scheduled refresh both take: find pairs, split
by patient, train, evaluate on the held-out patients through the node's inference path,
check for collapse, write the model, and activate it only when the rule in
``activation_decision`` allows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.dicom.volume import SeriesError
from pipeline.model.card import (
    LoadedModel,
    ModelCard,
    describe,
    load_model,
    save_model,
    weights_checksum,
)
from pipeline.model.inference import pick_device
from pipeline.model.registry import ModelRegistry, RegistryError
from train.dataset import prepare_study
from train.evaluate import KEY_METRICS, Evaluation, evaluate, format_table
from train.lesions import LesionMaskError, LesionMasks
from train.pairs import PairedVolume, find_pairs, load_pair, split_by_patient
from train.trainer import Progress, TrainSettings, train_network

# Two evaluations on the same data differ by float noise only below this; a new model
# that is "worse" by less is not worse.
TOLERANCE = {"psnr_head": 1e-3, "ssim_head": 1e-5, "corr_head": 1e-5, "lesion_fidelity": 1e-3}


@dataclass(frozen=True)
class TrainRequest:
    data: Sequence[Path]
    settings: TrainSettings
    name: str  # registry name; the shipped models are named by their direction
    holdout: Sequence[str] = ()
    validation_fraction: float = 0.2
    out: Path | None = None
    registry: ModelRegistry | None = None
    force: bool = False
    resume: bool = False
    checkpoint: Path | None = None
    command: str = ""
    salt: str = ""  # the node's harvest salt: harvested patients by salted pseudonym
    register: bool = True  # refine the alignment of pairs on different grids (registration)
    # Expert lesion masks: oversampled in training, scored on held-out patients.
    lesions: LesionMasks | None = None
    # Held-out metrics measured elsewhere (the ablation's leave-one-patient-out) for the card.
    reference_metrics: dict[str, Any] | None = None


@dataclass
class TrainOutcome:
    card: ModelCard
    evaluation: Evaluation
    written: list[Path] = field(default_factory=list)
    activated: bool = False
    messages: list[str] = field(default_factory=list)

    @property
    def shipped(self) -> bool:
        return not self.evaluation.collapsed()


def run_training(
    request: TrainRequest,
    say: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> TrainOutcome:
    """Train, evaluate and write one model as ``request`` says; see the module docstring.

    Raises ValueError when the data give no training pairs.
    """
    settings = request.settings
    search = find_pairs(request.data, request.salt)
    for note in search.notes:
        say(note)
    if not search.pairs:
        raise ValueError("no T1/T2 pairs found under " + ", ".join(map(str, request.data)))
    training_pairs, held_out_pairs = split_by_patient(
        search.pairs, request.holdout, request.validation_fraction, settings.seed
    )
    training = _load(training_pairs, request, say, "train")
    held_out = _load(held_out_pairs, request, say, "held out")
    if not training:
        raise ValueError("no training pairs: every paired patient is held out")

    studies = [prepare_study(item, settings) for item in training]
    validation = [prepare_study(item, settings) for item in held_out]
    result = train_network(
        studies, validation, settings, request.checkpoint, request.resume, progress
    )

    version = request.registry.next_version(request.name) if request.registry else "v1"
    card = ModelCard.from_settings(request.name, version, settings)
    card.training = {
        "data": [_describe_pair(item) for item in training],
        "held_out": [_describe_pair(item) for item in held_out],
        "command": request.command,
        "settings": asdict(settings),
        "epochs": len(result.history),
        "seed": settings.seed,
        "device": str(pick_device()),
        "seconds": round(result.seconds, 1),
        "samples_per_second": round(result.samples_per_second, 2),
        "history": result.history,
    }
    network = result.network.cpu().eval()
    # The checksum names the model in the evaluation's report; it depends on the weights only.
    card.checksum = weights_checksum(network.state_dict())
    loaded = LoadedModel(network, card, request.out or Path("(in memory)"))
    evaluation = evaluate(loaded, held_out or training)
    say(format_table(evaluation))
    card.metrics = {
        "held_out" if held_out else "training_data_only": evaluation.report(),
    }
    if request.reference_metrics is not None:
        card.metrics["reference"] = request.reference_metrics
    outcome = TrainOutcome(card, evaluation)

    if request.out is not None:
        outcome.card = save_model(request.out, loaded.network, card)
        outcome.written.append(request.out)
    if evaluation.collapsed():
        outcome.messages.append(
            "the model's output is collapsed (spread below the collapse threshold); "
            "it is not added to the registry"
        )
    elif request.registry is not None:
        _register(request, loaded, held_out, outcome)
    for message in outcome.messages:
        say(message)
    return outcome


def activation_decision(
    new: Evaluation | None, active: Evaluation | None, has_active: bool, force: bool
) -> tuple[bool, str]:
    """Whether a new model becomes active, and why.

    Active when forced; when no version is active yet; or when, on the same held-out
    evaluation data, it is not worse than the active version on any key metric
    (``evaluate.KEY_METRICS``), nor on lesion fidelity where the held-out studies have
    lesion masks, nor on the held-out studies a node would hold for output beyond the
    model's learnt range. Without held-out data there is nothing fair to compare on, so an
    active version stays.
    """
    if force:
        return True, "activated (--force)"
    if not has_active:
        return True, "activated: no version was active"
    if new is None or active is None:
        return False, (
            "not activated: no held-out patient to compare it with the active version on "
            "(hold one out with --holdout/--validation-fraction, or use --force)"
        )
    held, held_before = new.held_for_overshoot(), active.held_for_overshoot()
    if len(held) > len(held_before):
        return False, (
            "not activated: a node would hold its synthesis of "
            + ", ".join(held)
            + " for output beyond the range it learnt (an artefact), the active version's of "
            + (", ".join(held_before) or "none")
        )
    new_overall, active_overall = new.overall()["model"], active.overall()["model"]
    if "model" in new.lesion_fidelity() and "model" in active.lesion_fidelity():
        new_overall = {**new_overall, "lesion_fidelity": new.lesion_fidelity()["model"]}
        active_overall = {**active_overall, "lesion_fidelity": active.lesion_fidelity()["model"]}
    keys = [key for key in (*KEY_METRICS, "lesion_fidelity") if key in new_overall]
    worse = [
        f"{key} {new_overall[key]:.4f} < {active_overall[key]:.4f}"
        for key in keys
        if new_overall[key] < active_overall[key] - TOLERANCE[key]
    ]
    if worse:
        return False, "not activated: worse than the active version on held-out data: " + (
            ", ".join(worse)
        )
    compared = ", ".join(
        f"{key} {new_overall[key]:.4f} vs {active_overall[key]:.4f}" for key in keys
    )
    return True, f"activated: not worse than the active version on held-out data ({compared})"


def _register(
    request: TrainRequest, loaded: LoadedModel, held_out: list[PairedVolume], outcome: TrainOutcome
) -> None:
    registry, name = request.registry, request.name
    assert registry is not None
    try:
        active_path = registry.active_path(name)
    except RegistryError:
        active_path = None
    active_evaluation = None
    if active_path is not None and held_out:
        active = load_model(active_path)
        if active.card.direction == request.settings.direction:
            active_evaluation = evaluate(active, held_out)
            outcome.card.metrics["active_version_on_same_data"] = {
                "model": describe(active.card),
                "overall": active_evaluation.overall(),
            }
    activate, why = activation_decision(
        outcome.evaluation if held_out else None,
        active_evaluation,
        active_path is not None,
        request.force,
    )
    path = registry.path(name, outcome.card.version)
    outcome.card = save_model(path, loaded.network, outcome.card)
    registry.write_card(name, outcome.card)
    outcome.written.append(path)
    if activate:
        registry.activate(name, outcome.card.version)
    outcome.activated = activate
    outcome.messages.append(f"{describe(outcome.card)} written to {path}; {why}")


def _load(
    pairs: Sequence[Any], request: TrainRequest, say: Callable[[str], None], role: str
) -> list[PairedVolume]:
    settings = request.settings
    loaded = []
    for pair in pairs:
        try:
            item = load_pair(
                pair,
                settings.direction,
                request.register,
                settings.pixel_spacing_mm,
                request.lesions,
            )
        except (SeriesError, LesionMaskError) as error:
            say(f"{pair.label}: not used: {error}")
            continue
        say(f"{role}: {item.summary()}")
        if len(item.slices):
            loaded.append(item)
    return loaded


def _describe_pair(item: PairedVolume) -> dict[str, Any]:
    return {
        "study": item.pair.label,
        "patient": item.pair.patient,
        "slices": len(item.slices),
        "dropped": item.dropped,
    }


def load_reference_metrics(path: Path) -> dict[str, Any]:
    """Metrics from a JSON file (the ablation's summary) for a card, with where they came from."""
    return {"source": str(path), **json.loads(Path(path).read_text(encoding="utf-8"))}
