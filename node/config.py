"""config.toml -> typed settings, or one clear message per problem.

Each layer owns its settings type (`pipeline.completion.CompletionSettings`,
`pipeline.routing.Route`, ...); this module only reads the file, resolves relative paths
against the file's folder and checks what spans sections (routes name destinations).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.engine import make_url

from pipeline.completion import CompletionSettings
from pipeline.harvest import HarvestSettings
from pipeline.retention import RetentionSettings
from pipeline.routing import AE_TITLE_PATTERN, Destination, Route
from pipeline.settings import (
    ModelSettings,
    OutputSettings,
    UncertaintySettings,
    WorkerSettings,
)
from pipeline.state.deliveries import DeliverySettings
from pipeline.state.quality import MonitorSettings
from train.settings import RefreshSettings

DEFAULT_CONFIG = Path("config.toml")


class ConfigError(Exception):
    """A config file that cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(problems))

    def report(self) -> str:
        lines = [f"{self.path}: {len(self.problems)} problem(s):"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


class NodeSettings(BaseModel):
    """``[node]``: the node's own DICOM identity, network and storage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: Annotated[str, Field(pattern=AE_TITLE_PATTERN)] = "SYNTH"
    host: str = "0.0.0.0"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    storage: Path = Path("var/spool")
    database: str = "sqlite:///var/dicomnode.sqlite"
    # Empty: any caller. Else "AE" or "AE@host" entries; others are rejected at association.
    allowed_callers: list[str] = []
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    # A PDU must arrive in full this long after its first byte, or the connection is
    # aborted: a peer that announces a PDU and stalls holds nothing for longer.
    pdu_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # A connection that sends no A-ASSOCIATE-RQ this long after it opened is closed.
    association_request_timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 10.0
    log_level: str = "INFO"

    @field_validator("allowed_callers")
    @classmethod
    def _callers_are_ae_titles(cls, callers: list[str]) -> list[str]:
        for entry in callers:
            title, _, host = entry.partition("@")
            if not re.match(AE_TITLE_PATTERN, title) or ("@" in entry and not host):
                raise ValueError(f"{entry!r} is not 'AE' or 'AE@host' (AE: 1-16 characters)")
        return callers

    @field_validator("database")
    @classmethod
    def _is_database_url(cls, url: str) -> str:
        try:
            make_url(url)
        except Exception:
            raise ValueError(
                f"{url!r} is not an SQLAlchemy URL (e.g. sqlite:///var/dicomnode.sqlite, "
                "postgresql+psycopg://user@host/dicomnode)"
            ) from None
        return url

    @field_validator("log_level")
    @classmethod
    def _is_level(cls, level: str) -> str:
        allowed = ("DEBUG", "INFO", "WARNING", "ERROR")
        if level.upper() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return level.upper()

    def caller_allowed(self, ae_title: str, host: str) -> bool:
        """Whether the calling AE title (from ``host``) may associate."""
        if not self.allowed_callers:
            return True
        for entry in self.allowed_callers:
            title, _, bound_host = entry.partition("@")
            if title == ae_title and (not bound_host or bound_host == host):
                return True
        return False


class Config(BaseModel):
    """The whole config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: NodeSettings = NodeSettings()
    completion: CompletionSettings = CompletionSettings()
    models: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    output: OutputSettings = OutputSettings()
    monitor: MonitorSettings = MonitorSettings()
    uncertainty: UncertaintySettings = UncertaintySettings()
    harvest: HarvestSettings = HarvestSettings()
    delivery: DeliverySettings = DeliverySettings()
    refresh: RefreshSettings = RefreshSettings()
    retention: RetentionSettings = RetentionSettings()
    destinations: dict[str, Destination] = {}
    routes: list[Route] = []


def load_config(path: Path = DEFAULT_CONFIG) -> Config:
    """Read and check ``path``; raise ConfigError listing every problem found."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, ["file not found (give --config PATH)"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path, [f"not valid TOML: {error}"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, [f"cannot be read: {error}"]) from None
    return parse_config(raw, path)


def load_config_or_defaults(path: Path) -> Config:
    """``load_config(path)``, or where there is no such file the defaults, resolved against
    its folder: the ML engineer's commands run where no node is configured."""
    return load_config(path) if Path(path).is_file() else parse_config({}, Path(path))


def check_refresh(config: Config) -> list[str]:
    """A scheduled refresh needs its data folders."""
    if not config.refresh.enabled:
        return []
    if config.refresh.harvested and not config.harvest.enabled:
        return ["refresh.harvested: true, but [harvest] enabled = false harvests nothing"]
    if not config.refresh.data and not config.refresh.harvested:
        return [
            "refresh.data: empty, but refresh is enabled (give folders of paired studies, "
            "or harvested = true)"
        ]
    return [
        f"refresh.data: {folder} is not a folder"
        for folder in config.refresh.data
        if not folder.is_dir()
    ]


def check_models(config: Config) -> list[str]:
    """Problems with the models the routes name: missing, damaged, or the wrong direction."""
    from pipeline.model.card import ModelFileError, describe, load_model
    from pipeline.model.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(config.models.registry)
    problems = []
    for index, route in enumerate(config.routes):
        try:
            card = load_model(registry.active_path(route.model_name)).card
        except (RegistryError, ModelFileError) as error:
            problems.append(f"routes[{index}].model = {route.model_name!r}: {error}")
            continue
        if card.direction != route.direction:
            problems.append(
                f"routes[{index}].model = {route.model_name!r}: {describe(card)} synthesizes "
                f"{card.direction}, but route {route.name!r} has direction {route.direction}"
            )
    return problems


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Check the parsed TOML ``raw`` of the file at ``path``."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(path, [_describe(e) for e in error.errors()]) from None
    problems = _cross_section_problems(config)
    if problems:
        raise ConfigError(path, problems)
    config = _resolve_paths(config, path.resolve().parent)
    problems = check_refresh(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def _cross_section_problems(config: Config) -> list[str]:
    problems = []
    seen = set()
    for index, route in enumerate(config.routes):
        if route.name in seen:
            problems.append(f"routes[{index}].name = {route.name!r}: used by an earlier route")
        seen.add(route.name)
        problems += [f"routes[{index}].{line} (route {route.name!r})" for line in route.problems()]
        wants_uncertainty = route.hold_uncertainty_above is not None or route.send_uncertainty
        if wants_uncertainty and not config.uncertainty.enabled:
            problems.append(
                f"routes[{index}]: hold_uncertainty_above and send_uncertainty need "
                f"[uncertainty] enabled = true (route {route.name!r})"
            )
        for name in route.destinations:
            if name not in config.destinations:
                known = ", ".join(sorted(config.destinations)) or "none defined"
                problems.append(
                    f"routes[{index}].destinations: {name!r} is not a [destinations.NAME] "
                    f"section (defined: {known})"
                )
    return problems


def _resolve_paths(config: Config, base: Path) -> Config:
    storage = base / config.node.storage  # an absolute path stays as it is
    registry = base / config.models.registry
    url = make_url(config.node.database)
    if url.drivername.startswith("sqlite") and url.database not in (None, "", ":memory:"):
        database_path = Path(url.database)
        if not database_path.is_absolute():
            url = url.set(database=str(base / database_path))
    node = config.node.model_copy(
        update={"storage": storage, "database": url.render_as_string(hide_password=False)}
    )
    models = config.models.model_copy(update={"registry": registry})
    refresh = config.refresh.model_copy(update={"data": [base / p for p in config.refresh.data]})
    return config.model_copy(update={"node": node, "models": models, "refresh": refresh})


def _describe(error: dict[str, Any]) -> str:
    location = _location(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key (check its spelling and section in the README's reference)"
    if error["type"] == "missing":
        return f"{location}: required, but missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{location} = {error['input']!r}: {message}"


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("function-after[_one_kind(), HeaderCondition]",):
            continue
        else:
            text += ("." if text else "") + str(part)
    return text
