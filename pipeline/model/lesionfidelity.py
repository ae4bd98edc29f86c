"""What a model's card says of lesions on patients it never saw, read without torch: the
console and `dicomnode models` list cards, and must not pay for importing torch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FidelityRange:
    """Lesion fidelity over held-out studies: 1 as visible as in the real image, 0 gone."""

    lowest: float
    highest: float
    studies: int

    def percent(self) -> str:
        return f"{self.lowest:.0%} to {self.highest:.0%}"


def describe_lesion_fidelity(metrics: dict[str, Any]) -> str:
    """The lesion line of a model listing (``dicomnode models``, the console's models page)."""
    measured = held_out_lesion_fidelity(metrics)
    if measured is None:
        return "lesions: not measured on patients it never saw"
    return (
        f"lesions: kept {measured.percent()} of their real contrast on patients it never saw "
        f"({measured.studies} studies with lesion masks)"
    )


def held_out_lesion_fidelity(metrics: dict[str, Any]) -> FidelityRange | None:
    """The lowest and highest lesion fidelity per study on patients a model never saw, from
    its card's ``metrics``: its own held-out studies where they had lesion masks, else its
    recipe's k-fold (``reference``); None where neither measured one. The training data's
    is no guide. A card written by hand or by an older version may lack any part: what
    cannot be read counts as not measured, so a card never stops a synthesis."""
    studies = _field(metrics, "held_out", "studies") or []
    values = _finite(_field(study, "lesions", "model", "fidelity") for study in studies)
    if not values:
        reference = _field(metrics, "reference", "lesion_fidelity", "studies") or {}
        values = _finite(_field(study, "model") for study in _values(reference))
    if not values:
        return None
    return FidelityRange(min(values), max(values), len(values))


def _field(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _values(value: Any) -> list[Any]:
    return list(value.values()) if isinstance(value, dict) else []


def _finite(values: Iterable[Any]) -> list[float]:
    # A study whose real target does not show its lesion has no fidelity (None).
    return [
        float(value)
        for value in values
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ]
