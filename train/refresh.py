"""Scheduled retraining from the hospital's own paired studies (off by default).

``refresh_models`` retrains each configured direction on the configured folders and registers
the result through the same path as `dicomnode train` (``train.workflow``): a patient
fraction is held out, and the new version becomes active only if it is not collapsed and not
worse than the active version on those held-out patients. node/service.py schedules it daily
at ``time`` with APScheduler.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.modelfile import DIRECTIONS, describe
from pipeline.registry import ModelRegistry
from pipeline.unet import DEFAULT_ARGUMENTS
from train.trainer import TrainSettings
from train.workflow import TrainRequest, run_training

log = logging.getLogger(__name__)


class RefreshSettings(BaseModel):
    """``[refresh]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    data: list[Path] = []  # folders of paired studies (a PACS export, the spool's incoming/)
    time: str = "02:00"  # daily, local time, HH:MM
    directions: list[str] = list(DIRECTIONS)
    epochs: Annotated[int, Field(ge=1)] = 30
    steps_per_epoch: Annotated[int, Field(ge=1)] = 50
    # Held-out patients are what the activation rule compares on: without any, a refreshed
    # model never replaces an active one.
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    seed: int = 0

    @field_validator("time")
    @classmethod
    def _is_time_of_day(cls, value: str) -> str:
        match = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value.strip())
        if not match:
            raise ValueError(f'{value!r} is not a time of day HH:MM (e.g. "02:00")')
        return f"{int(match.group(1)):02d}:{match.group(2)}"

    @field_validator("directions")
    @classmethod
    def _known_directions(cls, values: list[str]) -> list[str]:
        unknown = [value for value in values if value not in DIRECTIONS]
        if unknown:
            raise ValueError(f"unknown direction(s) {unknown}; known: {', '.join(DIRECTIONS)}")
        return values

    @property
    def hour(self) -> int:
        return int(self.time.split(":")[0])

    @property
    def minute(self) -> int:
        return int(self.time.split(":")[1])


def refresh_models(settings: RefreshSettings, registry: ModelRegistry) -> list[str]:
    """Retrain every configured direction; return one line per direction saying what happened.

    A direction that fails (no pairs, unreadable data) is reported and the others still run.
    """
    if not settings.enabled:
        return ["refresh is disabled ([refresh] enabled = false)"]
    lines = []
    for direction in settings.directions:
        request = TrainRequest(
            data=settings.data,
            settings=TrainSettings(
                direction=direction,
                arguments=dict(DEFAULT_ARGUMENTS),
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
