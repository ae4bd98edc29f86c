"""Model files: a U-Net's weights together with its card, written atomically, checked on load.

A file is ``torch.save`` of ``{"format": FORMAT, "card": {...}, "state_dict": {...}}``, the
card as plain data (``card_dict``: its enums as their text), so that loading a file takes no
class of this project and ``weights_only`` loading accepts it. The card says what the model
is (architecture and its arguments, direction, normalisation), how it was made (training
data, command, seed) and how good it is (metrics); its checksum is the sha256 of the
weights, so a log line or a DICOM header that names it identifies the model.
"""

from __future__ import annotations

import enum
import hashlib
import io
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline.dicom.contrast import Direction
from pipeline.files import write_atomically
from pipeline.model.preprocess import Normalization, input_channels
from pipeline.model.unet import UNet, default_arguments

FORMAT = "dicomnode-model/1"
ARCHITECTURES = ("unet",)


class ModelFileError(Exception):
    """A model file that cannot be used; the message says which file and why."""


@dataclass
class ModelCard:
    """What a model is, how it was made and how good it is.

    ``gradient_channels`` and ``neighbour_distance_mm`` are stated on their own although
    ``arguments["in_channels"]`` follows from them (``preprocess.input_channels``):
    preprocessing reads them, and the card is rejected where they disagree.
    ``normalization`` is the input's; the output is in ``target_normalization``'s space
    (the targets' in training), None meaning the same. A card read from a file holds its
    choices as enums; one built in code may hold their text, which compares equal.
    """

    name: str
    version: str
    direction: Direction
    arguments: dict[str, Any]
    normalization: Normalization
    gradient_channels: bool
    target_normalization: Normalization | None = None
    # The in-plane pixel size (mm) the model learnt at; inference resamples slices whose
    # pixels are far from it. Every model before this field learnt at 0.88-1 mm.
    pixel_spacing_mm: float = 1.0
    # With a distance (mm), the network also sees the slices that far below and above each
    # slice (pipeline.model.preprocess.neighbour_slices); None: each slice alone (every model
    # before this field).
    neighbour_distance_mm: float | None = None
    architecture: str = "unet"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    checksum: str = ""

    @property
    def output_normalization(self) -> Normalization:
        return self.target_normalization or self.normalization

    @classmethod
    def from_settings(cls, name: str, version: str, settings: TrainedAs) -> ModelCard:
        """The card of a network trained with ``settings`` (train.trainer.TrainSettings),
        before its training record, metrics and checksum are added."""
        return cls(
            name=name,
            version=version,
            direction=settings.direction,
            arguments=dict(settings.arguments),
            normalization=settings.normalization,
            target_normalization=settings.target_normalization,
            pixel_spacing_mm=settings.pixel_spacing_mm,
            neighbour_distance_mm=settings.neighbour_distance_mm,
            gradient_channels=settings.gradient_channels,
        )


class TrainedAs(Protocol):
    """What a card takes from the settings a model was trained with."""

    direction: Direction
    arguments: dict[str, Any]
    normalization: Normalization
    target_normalization: Normalization | None
    pixel_spacing_mm: float
    neighbour_distance_mm: float | None
    gradient_channels: bool


@dataclass(frozen=True)
class LoadedModel:
    """A checked model, its network in eval mode on its device."""

    network: UNet
    card: ModelCard
    path: Path


def describe(card: ModelCard) -> str:
    """One-line identity of a model for logs: ``name version (sha256:abcd1234)``.

    Versions carry their own form ("v2" in the registry), so nothing is prefixed.
    """
    return f"{card.name} {card.version} (sha256:{card.checksum[:8]})"


def weights_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 hex of a state dict: each tensor's name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        # Viewed as bytes so that any dtype hashes the same way, bfloat16 included.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model(path: Path, network: UNet, card: ModelCard) -> ModelCard:
    """Write ``network`` and ``card`` to ``path`` atomically; return the card with its checksum.

    Raises ModelFileError if the card is invalid or does not describe ``network``, so a file
    that could not be loaded is never written.
    """
    state_dict = {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}
    card = replace(card, checksum=weights_checksum(state_dict))
    _build_network(_checked(card, path), state_dict, path)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "card": card_dict(card), "state_dict": state_dict}, buffer)
    write_atomically(path, buffer.getvalue())
    return card


def load_model(path: Path, device: torch.device | str | None = None) -> LoadedModel:
    """Read and check a model file; return its network in eval mode on ``device`` (default CPU).

    Raises ModelFileError, with a message for the admin, for a missing or unreadable file, a
    file that is not a dicomnode model or is of another format version, a card with an
    unknown architecture, normalisation or direction, weights that do not fit the card's
    arguments, and weights whose checksum is not the card's (the file was altered).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelFileError(
            # torch's own message advises weights_only=False, which an admin must not follow
            # for a file of unknown origin; the chained error keeps the details for logs.
            f"{path} is not a readable dicomnode model file (damaged, truncated, or another "
            f"kind of file; torch could not load it: {type(error).__name__})"
        ) from error
    if not isinstance(content, dict) or not {"format", "card", "state_dict"} <= content.keys():
        raise ModelFileError(f"{path} is not a dicomnode model file (no format, card and weights)")
    if content["format"] != FORMAT:
        raise ModelFileError(
            f"{path} has model format {content['format']!r}; this version of dicomnode reads "
            f"{FORMAT!r} only"
        )
    card = _checked(_card_from_dict(content["card"], path), path)
    state_dict = content["state_dict"]
    if not isinstance(state_dict, dict) or not all(
        isinstance(tensor, torch.Tensor) for tensor in state_dict.values()
    ):
        raise ModelFileError(f"{path}: the weights are not a mapping of names to tensors")
    actual = weights_checksum(state_dict)
    if actual != card.checksum:
        raise ModelFileError(
            f"{path}: the weights' checksum sha256:{actual[:8]} is not the card's "
            f"sha256:{card.checksum[:8]}; the file was altered or damaged after it was saved"
        )
    network = _build_network(card, state_dict, path)
    network.to(torch.device(device) if device is not None else torch.device("cpu"))
    return LoadedModel(network=network.eval(), card=card, path=path)


def _card_from_dict(values: Any, path: Path) -> ModelCard:
    names = {item.name for item in fields(ModelCard)}
    # Fields with a default may be absent: cards written before the field existed.
    required = {
        item.name
        for item in fields(ModelCard)
        if item.default is MISSING and item.default_factory is MISSING
    }
    if not isinstance(values, dict):
        raise ModelFileError(f"{path}: the model card is not a mapping")
    missing = sorted(required - values.keys())
    unknown = sorted(values.keys() - names)
    if missing or unknown:
        raise ModelFileError(
            f"{path}: the model card lacks {missing or 'nothing'} and has unknown fields "
            f"{unknown or 'none'}"
        )
    return ModelCard(**values)


def card_dict(card: ModelCard) -> dict[str, Any]:
    """``card`` as plain data, its enums as their text: what a model file and the readable
    card beside it hold."""
    return _plain(asdict(card))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(item) for item in value)
    return value


def _checked(card: ModelCard, path: Path) -> ModelCard:
    """``card`` with its choices as enums; ModelFileError for anything it cannot be."""

    def reject_unknown(what: str, value: object, choices: Iterable[str]) -> None:
        known = list(choices)
        if value not in known:
            raise ModelFileError(
                f"{path}: unknown {what} {value!r} on the model card; known: {', '.join(known)}"
            )

    if not isinstance(card.arguments, dict):
        raise ModelFileError(f"{path}: the card's arguments are not a mapping")
    reject_unknown("architecture", card.architecture, ARCHITECTURES)
    reject_unknown("normalization", card.normalization, Normalization)
    reject_unknown("target_normalization", card.output_normalization, Normalization)
    reject_unknown("direction", card.direction, Direction)
    if not isinstance(card.pixel_spacing_mm, int | float) or not card.pixel_spacing_mm > 0:
        raise ModelFileError(
            f"{path}: the card's pixel_spacing_mm {card.pixel_spacing_mm!r} is not a positive "
            "number of millimetres"
        )
    distance = card.neighbour_distance_mm
    if distance is not None and (not isinstance(distance, int | float) or not distance > 0):
        raise ModelFileError(
            f"{path}: the card's neighbour_distance_mm {distance!r} is not a positive number "
            "of millimetres (or null for a model that sees each slice alone)"
        )
    expected = input_channels(card.gradient_channels, distance is not None)
    in_channels = (default_arguments() | card.arguments)["in_channels"]
    if in_channels != expected:
        raise ModelFileError(
            f"{path}: the card says gradient_channels={card.gradient_channels} and "
            f"neighbour_distance_mm={distance}, which need in_channels={expected}, but its "
            f"arguments have in_channels={in_channels}"
        )
    target = card.target_normalization
    return replace(
        card,
        direction=Direction(card.direction),
        normalization=Normalization(card.normalization),
        target_normalization=None if target is None else Normalization(target),
    )


def _build_network(card: ModelCard, state_dict: dict[str, torch.Tensor], path: Path) -> UNet:
    try:
        network = UNet(**card.arguments)
    except (TypeError, ValueError) as error:
        raise ModelFileError(
            f"{path}: the card's arguments {card.arguments} are invalid: {error}"
        ) from error
    try:
        network.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ModelFileError(
            f"{path}: the weights do not fit a U-Net with the card's arguments "
            f"{card.arguments}: {error}"
        ) from error
    return network
