"""Routing rules: which complete series become which job, and where the result goes.

Rules are tried in the order of config.toml and the FIRST rule that matches fires, like
firewall rules: put specific exceptions above general rules. A series no rule matches is
ignored, and the reason lists why each rule did not match.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from pipeline.dicom.contrast import Contrast, Direction
from pipeline.dicom.values import number_or_none

# AE titles: 1-16 characters of the default character repertoire, no backslash or control.
AE_TITLE_PATTERN = r"^[\x20-\x5b\x5d-\x7e]{1,16}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DestinationTLS(_Strict):
    """``tls = { ca = ..., certificate = ..., key = ... }`` of a destination: send over TLS
    (1.2 or newer), trusting the peer's certificate only if ``ca`` signed it and it names
    the destination's host; ``certificate`` and ``key`` are this node's, for a peer that
    requires client certificates. Relative paths are resolved against config.toml's folder."""

    ca: Path
    certificate: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _certificate_with_key(self) -> DestinationTLS:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("certificate and key go together: give both or neither")
        return self


class Destination(_Strict):
    """A DICOM peer the node sends synthetic series to (``[destinations.NAME]``)."""

    ae_title: Annotated[str, Field(pattern=AE_TITLE_PATTERN)]
    host: Annotated[str, Field(min_length=1)]
    # Strict: a port written as text ("4242") is a mistake config check names.
    port: Annotated[int, Field(strict=True, ge=1, le=65535)]
    tls: DestinationTLS | None = None


class HeaderCondition(_Strict):
    """One condition on a header keyword: an exact value, a regular expression or a range.

    Multi-valued attributes are compared as DICOM writes them, joined by backslashes
    (``ORIGINAL\\PRIMARY\\M``). A range compares numerically.
    """

    equals: str | float | None = None
    regex: str | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> HeaderCondition:
        kinds = [self.equals is not None, self.regex is not None]
        kinds.append(self.min is not None or self.max is not None)
        if sum(kinds) != 1:
            raise ValueError("give exactly one of: a value, {regex = ...}, {min/max = ...}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as error:
                raise ValueError(f"regex {self.regex!r} is not valid: {error}") from None
        return self

    def mismatch(self, keyword: str, value: Any) -> str | None:
        """None when ``value`` satisfies this condition, else why it does not."""
        if value is None:
            return f"{keyword} is absent"
        text = "\\".join(map(str, value)) if isinstance(value, list) else str(value)
        if self.regex is not None:
            if re.search(self.regex, text):
                return None
            return f"{keyword} {text!r} does not match /{self.regex}/"
        if self.equals is not None:
            if isinstance(self.equals, (float, int)):
                ok = number_or_none(value) == float(self.equals)
            else:
                ok = text == self.equals
            return None if ok else f"{keyword} {text!r} is not {self.equals!r}"
        number = number_or_none(value)
        if number is None:
            return f"{keyword} {text!r} is not a number"
        if (self.min is not None and number < self.min) or (
            self.max is not None and number > self.max
        ):
            return f"{keyword} {number:g} is outside [{self.min}, {self.max}]"
        return None


class Route(_Strict):
    """One ``[[routes]]`` rule of config.toml."""

    name: Annotated[str, Field(min_length=1)]
    direction: Direction
    # Contrasts the rule accepts; default: the direction's source (T1 for t1-to-t2).
    # FLAIR or T1C are only synthesized from when a rule lists them here.
    contrast: list[Contrast] | None = None
    calling_ae: list[Annotated[str, Field(pattern=AE_TITLE_PATTERN)]] = []
    match: dict[str, HeaderCondition] = {}
    # Model name in the registry; default: the direction ("t1-to-t2").
    model: str | None = None
    destinations: Annotated[list[str], Field(min_length=1)]
    quiet_seconds: Annotated[float, Field(gt=0)] | None = None
    # Synthesize a series short of the count its header announced (else its job fails
    # as incomplete, pipeline.completion).
    allow_incomplete: bool = False
    # A synthesis whose series uncertainty ([uncertainty]) exceeds this is held, not sent.
    hold_uncertainty_above: Annotated[float, Field(gt=0)] | None = None
    # Send the per-voxel uncertainty map too, as its own derived series.
    send_uncertainty: bool = False

    @field_validator("match", mode="before")
    @classmethod
    def _plain_values_are_exact(cls, conditions: Any) -> Any:
        if isinstance(conditions, Mapping):
            return {
                key: value if isinstance(value, Mapping) else {"equals": value}
                for key, value in conditions.items()
            }
        return conditions

    @field_validator("match")
    @classmethod
    def _keywords_exist(cls, conditions: dict[str, HeaderCondition]) -> dict:
        unknown = [key for key in conditions if tag_for_keyword(key) is None]
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)}: not a DICOM keyword (use the standard's keyword, "
                "e.g. SeriesDescription, MagneticFieldStrength)"
            )
        return conditions

    def problems(self) -> list[str]:
        """Why this route cannot make sense, one line per key (empty: it can), for
        ``node.config``: each line names the key, the route follows."""
        problems = []
        for contrast in self.accepted_contrasts:
            if contrast is Contrast.OTHER:
                problems.append(
                    f"contrast: OTHER takes what the node cannot classify, its own synthetic "
                    f"output included (derived images are OTHER); name the contrasts "
                    f"({self.direction.source} for {self.direction})"
                )
            elif contrast in self.direction.target_family:
                problems.append(
                    f"contrast: {contrast} contradicts direction {self.direction}, which "
                    f"synthesizes {self.direction.target} from {self.direction.source}"
                )
        return problems

    @property
    def accepted_contrasts(self) -> list[Contrast]:
        return self.contrast if self.contrast is not None else [self.direction.source]

    @property
    def model_name(self) -> str:
        return self.model or self.direction.value

    def mismatch(
        self, contrast: Contrast, header: Mapping[str, Any], calling_ae: str
    ) -> str | None:
        """None when this rule matches the series, else the first reason it does not."""
        if contrast not in self.accepted_contrasts:
            accepted = "/".join(self.accepted_contrasts)
            return f"contrast {contrast} is not {accepted}"
        if self.calling_ae and calling_ae not in self.calling_ae:
            return f"calling AE {calling_ae!r} is not one of {', '.join(self.calling_ae)}"
        for keyword, condition in self.match.items():
            reason = condition.mismatch(keyword, header.get(keyword))
            if reason:
                return reason
        return None


@dataclass(frozen=True)
class RouteDecision:
    route: Route | None
    reason: str  # why this route fired, or why none did


def select_route(
    routes: Sequence[Route], contrast: Contrast, header: Mapping[str, Any], calling_ae: str
) -> RouteDecision:
    """The first route matching the series, or None with every route's reason."""
    reasons = []
    for route in routes:
        reason = route.mismatch(contrast, header, calling_ae)
        if reason is None:
            return RouteDecision(route, f"route {route.name!r} matched")
        reasons.append(f"route {route.name!r}: {reason}")
    if not reasons:
        return RouteDecision(None, "no routes are configured")
    return RouteDecision(None, "no route matched (" + "; ".join(reasons) + ")")


def header_keywords(routes: Sequence[Route]) -> set[str]:
    """Keywords the routes look at, so intake records them with each series."""
    return {keyword for route in routes for keyword in route.match}
