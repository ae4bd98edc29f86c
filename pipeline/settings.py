"""Settings of the pipeline's parts that run models.

Kept apart from the code they configure so that reading config.toml does not import
torch (about 2 s): the admin's quick commands (status, route, retry) start at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


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


# What a node writes when config.toml says nothing about [output] (and `dicomnode translate`).
DEFAULT_OUTPUT = OutputSettings()
