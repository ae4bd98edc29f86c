"""Settings of the pipeline's parts that run models.

Kept apart from the code they configure so that reading config.toml does not import
torch (about 2 s): the admin's quick commands (status, route, retry) start at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelSettings(BaseModel):
    """``[models]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The registry folder; relative paths are resolved against config.toml's folder.
    registry: Path = Path("models")


class WorkerSettings(BaseModel):
    """``[worker]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # `dicomnode serve` runs one worker in its own process unless this is false (then run
    # `dicomnode worker` elsewhere, on the same database and spool).
    in_process: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 30.0
    # Longer than any job takes; a worker that dies holds its job this long at most.
    lease_seconds: Annotated[float, Field(gt=0)] = 900.0
    poll_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0


class OutputSettings(BaseModel):
    """``[output]`` in config.toml: how the synthetic series is marked beyond its header."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "SYNTHETIC" burnt into the air outside the head of every image (pipeline.dicom.label).
    burn_in_label: bool = True
    # A synthesis with more output than this (mL) beyond the range its model learnt is held,
    # not sent (pipeline.model.overshoot); inf never holds.
    hold_overshoot_above_ml: Annotated[float, Field(ge=0)] = 0.1


class UncertaintySettings(BaseModel):
    """``[uncertainty]`` in config.toml: the Monte-Carlo dropout beside each synthesis."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # Passes with dropout on, beside the plain one: each costs one plain synthesis.
    passes: Annotated[int, Field(ge=1, le=100)] = 2
    # The most a synthesis with its uncertainty may cost, in plain syntheses.
    max_cost: Annotated[float, Field(ge=1)] = 3.0

    @model_validator(mode="after")
    def _within_cost(self) -> UncertaintySettings:
        if self.enabled and self.passes + 1 > self.max_cost:
            raise ValueError(
                f"passes = {self.passes} costs {self.passes + 1} plain syntheses, more than "
                f"max_cost = {self.max_cost:g}"
            )
        return self

    @property
    def passes_to_run(self) -> int:
        return self.passes if self.enabled else 0


# What a node writes when config.toml says nothing about [output] (and `dicomnode translate`).
DEFAULT_OUTPUT = OutputSettings()
DEFAULT_UNCERTAINTY = UncertaintySettings()
