"""Small, randomly initialised model files in a registry, for tests of the node's plumbing.

Their images are meaningless; what they let a test check is that a job runs the model the
registry names and that the output is written, marked and delivered.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.model.card import ModelCard, save_model
from pipeline.model.registry import ModelRegistry
from pipeline.model.unet import UNet
from train.trainer import TrainSettings

TINY = {"in_channels": 3, "out_channels": 1, "base_width": 4, "depth": 2, "dropout": 0.0}


def make_registry(
    root: Path, version: str = "v1", seed: int = 0, dropout: float = 0.0
) -> ModelRegistry:
    """A registry with a tiny active model for each direction."""
    registry = ModelRegistry(root)
    for direction in ("t1-to-t2", "t2-to-t1"):
        add_model(registry, direction, version, seed, dropout)
        registry.activate(direction, version)
    return registry


def add_model(
    registry: ModelRegistry,
    direction: str,
    version: str,
    seed: int = 0,
    dropout: float = 0.0,
    constant: float | None = None,
) -> Path:
    """A tiny random model; with ``dropout``, one whose Monte-Carlo passes disagree; with
    ``constant``, one that draws that value everywhere (beyond its learnt range above 1)."""
    torch.manual_seed(seed)
    arguments = TINY | {"dropout": dropout}
    network = UNet(**arguments)
    if constant is not None:
        with torch.no_grad():
            network.head.weight.zero_()
            network.head.bias.fill_(constant)
    card = ModelCard(
        name=direction,
        version=version,
        direction=direction,
        arguments=arguments,
        normalization="percentile-volume",
        gradient_channels=True,
        training={"data": "none: random initialisation, for tests"},
    )
    path = registry.path(direction, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(path, network, card)
    return path


def activate_recipe(
    registry: ModelRegistry, settings: TrainSettings, reference: dict[str, Any]
) -> str:
    """A new active version of the model named by ``settings``' direction, untrained, whose
    card records ``settings`` as its recipe and ``reference`` as the recipe's k-fold figures
    (as `train.ablation --attach` puts them); returns the version."""
    name = settings.direction.value
    version = registry.next_version(name)
    card = ModelCard.from_settings(name, version, settings)
    card.training = {"settings": asdict(settings)}
    card.metrics = {"reference": reference}
    card = save_model(registry.path(name, version), UNet(**settings.arguments), card)
    registry.write_card(name, card)
    registry.activate(name, version)
    return version
