"""Scheduled retraining from the hospital's own paired studies (off by default).

``refresh_models`` retrains each configured direction on the configured folders and registers
the result through the same path as `dicomnode train` (``train.workflow``): a patient
fraction is held out, and the new version becomes active only if it is not collapsed and not
worse than the active version on those held-out patients. node/service.py schedules it daily
at ``time`` with APScheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.model.card import describe
from pipeline.model.registry import ModelRegistry
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

    A direction that fails (no pairs, unreadable data) is reported and the others still run.
    """
    if not settings.enabled:
        return ["refresh is disabled ([refresh] enabled = false)"]
    lines = []
    for direction in settings.directions:
        request = TrainRequest(
            data=[*settings.data, *harvested],
            salt=salt,
            settings=TrainSettings(
                direction=direction,
                epochs=settings.epochs,
                steps_per_epoch=settings.steps_per_epoch,
                seed=settings.seed,
            ),
            name=direction,
            validation_fraction=settings.validation_fraction,
            registry=registry,
            command=f"scheduled refresh ({settings.model_dump_json()})",
        )
        try:
            outcome = run_training(request, say=log.info)
        except (ValueError, OSError) as error:
            lines.append(f"{direction}: not refreshed: {error}")
            continue
        what = "; ".join(outcome.messages) or "no message"
        lines.append(f"{direction}: {describe(outcome.card)}: {what}")
    for line in lines:
        log.info("refresh: %s", line)
    return lines
