"""Settings of the training side that config.toml holds.

Kept apart from the training code so that reading config.toml does not import torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.dicom.contrast import Direction


class RefreshSettings(BaseModel):
    """``[refresh]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    data: list[Path] = []  # folders of paired studies (a PACS export, the spool's incoming/)
    # Also the pairs the node harvested ([harvest]), patients by salted pseudonym.
    harvested: bool = False
    time: str = "02:00"  # daily, local time, HH:MM
    directions: list[Direction] = list(Direction)
    # The training length; None: the active model's recipe's (train.recipe), like the
    # rest of the recipe.
    epochs: Annotated[int, Field(ge=1)] | None = None
    steps_per_epoch: Annotated[int, Field(ge=1)] | None = None
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

    @property
    def hour(self) -> int:
        return int(self.time.split(":")[0])

    @property
    def minute(self) -> int:
        return int(self.time.split(":")[1])
