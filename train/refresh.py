"""Scheduled retraining from the hospital's own paired studies (off by default).

``refresh_models`` retrains each configured direction on the configured folders, with the
recipe of its active model (``train.recipe``), and registers the result through the same
path as `dicomnode train` (``train.workflow``): a patient fraction is held out, and the new
version becomes active only if it is not collapsed and not worse than the active version on
those held-out patients. node/service.py schedules it daily at ``time`` with APScheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.model.card import describe
from pipeline.model.registry import ModelRegistry
from train.recipe import active_recipe
from train.settings import RefreshSettings
from train.trainer import TrainSettings
from train.workflow import TrainRequest, run_training

log = logging.getLogger(__name__)


def refresh_models(
    settings: RefreshSettings,
    registry: ModelRegistry,
    harvested: Sequence[Path] = (),
    salt: str = "",
) -> list[str]:
    """Retrain every configured direction; return one line per direction saying what happened.
    ``harvested``: the harvest's folder when ``settings.harvested``, its patients named with
    the node's ``salt``.

    A direction that fails (no pairs, unreadable data, an active model whose recipe cannot
    be repeated) is reported and the others still run.
    """
    if not settings.enabled:
        return ["refresh is disabled ([refresh] enabled = false)"]
    lines = []
    for direction in settings.directions:
        try:
            recipe = refresh_recipe(settings, registry, direction)
        except ValueError as error:
            lines.append(f"{direction}: not refreshed: its active model's recipe: {error}")
            continue
        request = TrainRequest(
            data=[*settings.data, *harvested],
            salt=salt,
            settings=recipe.settings,
            name=direction,
            validation_fraction=settings.validation_fraction,
            registry=registry,
            command=f"scheduled refresh ({settings.model_dump_json()}), {recipe.origin}",
            reference_metrics=recipe.reference,
        )
        try:
            outcome = run_training(request, say=log.info)
        except (ValueError, OSError) as error:
            lines.append(f"{direction}: not refreshed: {error}")
            continue
        what = "; ".join(outcome.messages) or "no message"
        lines.append(f"{direction}: {describe(outcome.card)} ({recipe.origin}): {what}")
    for line in lines:
        log.info("refresh: %s", line)
    return lines


@dataclass(frozen=True)
class RefreshRecipe:
    settings: TrainSettings
    origin: str  # whose recipe, for the log line and the card's command
    reference: dict[str, Any] | None  # the recipe's k-fold figures, for the new card


def refresh_recipe(
    settings: RefreshSettings, registry: ModelRegistry, direction: str
) -> RefreshRecipe:
    """The recipe a refresh of ``direction`` trains: its active model's, with the refresh's
    seed and, where ``[refresh]`` sets them, its length; the library's defaults (the v5
    recipe) only where no version is active yet. ValueError where the active version's
    card does not record a recipe this version can train: a refresh must not replace a
    model with another recipe's unnoticed."""
    lengths = {
        key: value
        for key in ("epochs", "steps_per_epoch")
        if (value := getattr(settings, key)) is not None
    }
    if direction not in registry.active_versions():
        defaults = TrainSettings(direction=direction, seed=settings.seed, **lengths)
        return RefreshRecipe(defaults, "the default recipe: no version is active yet", None)
    active = active_recipe(registry, direction)
    recipe = replace(active.settings, direction=direction, seed=settings.seed, **lengths)
    return RefreshRecipe(recipe, str(active), active.reference_for(recipe))
