"""The recipe a retraining repeats: the active model's, as its card records it.

Every model card keeps the settings it was trained with (``training.settings``). Retraining a
model on new data (the daily refresh, `dicomnode train --recipe active`) repeats that recipe
rather than the library's defaults: the shipped t1-to-t2 v7 is base width 16 with a small
lesion painted into every crop, and the defaults (the v5 recipe) keep less of an MS
patient's plaques (docs/ablation.md). A retraining that fell back to them would be compared
on the hospital's held-out patients, which have no lesion masks, so nothing would stop it.

The recipe's held-out k-fold figures (``metrics.reference``) go onto the new card only
while the recipe is unchanged but for its seed: they describe the recipe, not the weights,
and without them the new model's images would say that the visibility of lesions was never
measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from pipeline.choices import Choice
from pipeline.model.card import ModelFileError
from pipeline.model.registry import ModelRegistry, RegistryError
from train.trainer import TrainSettings


class Recipe(Choice):
    """What a training starts from, before the options given change it."""

    DEFAULTS = "defaults"  # TrainSettings' defaults: the v5 recipe
    ACTIVE = "active"  # the recipe of the registry's active version of the model


@dataclass(frozen=True)
class ActiveRecipe:
    """How the active version of a model was trained, and what that recipe scored held out."""

    name: str
    version: str
    settings: TrainSettings
    reference: dict[str, Any] | None  # the recipe's k-fold figures, where its card has them

    def reference_for(self, settings: TrainSettings) -> dict[str, Any] | None:
        """The recipe's k-fold figures if ``settings`` is this recipe, whatever its seed."""
        same = replace(settings, seed=self.settings.seed) == self.settings
        return self.reference if same else None

    def __str__(self) -> str:
        return f"the recipe of {self.name} {self.version}"


def active_recipe(registry: ModelRegistry, name: str) -> ActiveRecipe:
    """The recipe of ``name``'s active version. ValueError says why there is none to repeat:
    no active version, an unreadable card, or a card that does not record its settings in
    a form this version can train."""
    try:
        version = registry.active_version(name)
        card = registry.read_card(name, version)
    except (RegistryError, ModelFileError, OSError, ValueError) as error:
        raise ValueError(str(error)) from None
    training = card.get("training") if isinstance(card, dict) else None
    record = training.get("settings") if isinstance(training, dict) else None
    if not isinstance(record, dict):
        raise ValueError(f"the card of {name} {version} does not record its training settings")
    try:
        settings = TrainSettings.from_record(record)
    except ValueError as error:
        raise ValueError(f"{name} {version}: {error}") from None
    metrics = card.get("metrics")
    reference = metrics.get("reference") if isinstance(metrics, dict) else None
    return ActiveRecipe(name, version, settings, reference if isinstance(reference, dict) else None)
