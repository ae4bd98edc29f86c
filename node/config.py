"""config.toml -> typed settings, or one clear message per problem.

Each layer owns its settings type (`pipeline.completion.CompletionSettings`,
`pipeline.routing.Route`, ...); this module only reads the file, resolves relative paths
against the file's folder and checks what spans sections (routes name destinations).
"""

from __future__ import annotations

import difflib
import errno
import re
import socket
import tempfile
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError

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
from pipeline.state.filesystems import network_filesystem_problem
from pipeline.state.quality import MonitorSettings
from train.settings import RefreshSettings

DEFAULT_CONFIG = Path("config.toml")
# Strict: a port written as text ("11112") is a mistake to name, not to guess.
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]


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


class NodeTLS(BaseModel):
    """``[node.tls]``: DICOM over TLS (1.2 or newer), on ``port`` beside the plain port, or
    instead of plain DICOM on ``[node] port`` when no port is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    certificate: Path  # the node's certificate (PEM), with any intermediates after it
    key: Path  # its private key (PEM, unencrypted: the node starts unattended)
    ca: Path | None = None  # CA bundle (PEM) that signs the certificates of callers
    require_client_certificate: bool = True
    port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @model_validator(mode="after")
    def _ca_to_check_callers(self) -> NodeTLS:
        if self.require_client_certificate and self.ca is None:
            raise ValueError(
                "require_client_certificate = true needs ca (the bundle that signs callers' "
                "certificates)"
            )
        return self


class NodeSettings(BaseModel):
    """``[node]``: the node's own DICOM identity, network and storage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: Annotated[str, Field(pattern=AE_TITLE_PATTERN)] = "SYNTH"
    host: str = "0.0.0.0"
    port: Port = 11112
    storage: Path = Path("var/spool")
    # Below this much free space on the spool's disk, /health and `dicomnode status` fail.
    min_free_spool_mb: Annotated[int, Field(ge=0)] = 1024
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
    tls: NodeTLS | None = None
    # Processes receiving on the port (one shared socket), each with its own interpreter lock;
    # unset: one per CPU core (node.receivers).
    receivers: Annotated[int, Field(ge=1, le=64)] | None = None

    @field_validator("allowed_callers")
    @classmethod
    def _callers_are_ae_titles(cls, callers: list[str]) -> list[str]:
        for entry in callers:
            caller = AllowedCaller.parse(entry)
            if (
                not re.match(AE_TITLE_PATTERN, caller.ae_title)
                or caller.host == ""
                or caller.subject == ""
            ):
                raise ValueError(
                    f"{entry!r} is not 'AE', 'AE@host', 'AE#certificate name' or "
                    "'AE@host#certificate name' (AE: 1-16 characters)"
                )
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

    def caller_allowed(self, ae_title: str, host: str, subject: str | None = None) -> bool:
        """Whether the calling AE title (from ``host``, over TLS with a client certificate
        whose common name is ``subject``) may associate."""
        if not self.allowed_callers:
            return True
        return any(
            AllowedCaller.parse(entry).admits(ae_title, host, subject)
            for entry in self.allowed_callers
        )


@dataclass(frozen=True)
class AllowedCaller:
    """An ``allowed_callers`` entry: an AE title, optionally bound to a host (``@host``)
    and to the common name of a client certificate (``#name``, over TLS only)."""

    ae_title: str
    host: str | None
    subject: str | None

    @classmethod
    def parse(cls, entry: str) -> AllowedCaller:
        caller, has_subject, subject = entry.partition("#")
        title, has_host, host = caller.partition("@")
        return cls(title, host if has_host else None, subject if has_subject else None)

    def admits(self, ae_title: str, host: str, subject: str | None) -> bool:
        return (
            self.ae_title == ae_title
            and self.host in (None, host)
            and (self.subject is None or self.subject == subject)
        )


class HttpSettings(BaseModel):
    """``[http]``: the admin's console that `serve` runs (pages, /metrics, /health)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # Loopback by default: the pages show what the node holds; open it up deliberately.
    host: str = "127.0.0.1"
    port: Port = 11180
    # Without a token the console is read-only; with one, its actions need it.
    admin_token: Annotated[str, Field(min_length=16)] | None = None
    show_patient_names: bool = False


class Config(BaseModel):
    """The whole config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: NodeSettings = NodeSettings()
    http: HttpSettings = HttpSettings()
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


def check_database(config: Config) -> list[str]:
    """The database's driver must be installed and an SQLite file's folder makeable; an
    SQLite database on a network filesystem (NFS, CIFS) is refused: its locking does not
    hold there (pipeline.state.filesystems)."""
    problem = _database_problem(config.node.database)
    if problem:
        return [problem]
    database = sqlite_file(config.node.database)
    if database is None:
        return []
    problem = network_filesystem_problem(database)
    return [f"node.database = {config.node.database!r}: {problem}"] if problem else []


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


def check_environment(config: Config, *, worker: bool) -> tuple[list[str], list[str]]:
    """(problems, warnings): what `serve` would die of or do wrong on this machine, which
    the file alone does not show, beside the database's (``check_database``). ``worker``:
    also what a synthesis worker needs."""
    node = config.node
    problems = [
        problem
        for problem in (
            folder_problem("node.storage", node.storage),
            _listen_problem("node", node.host, node.port),
        )
        if problem
    ]
    if config.http.enabled:
        if config.http.port == node.port:
            problems.append(f"http.port = {config.http.port}: the same as node.port")
        else:
            problems += filter(None, [_listen_problem("http", config.http.host, config.http.port)])
    if worker and config.worker.device == "cuda":
        from pipeline.model.inference import why_no_cuda  # torch: 2 s, only for CUDA

        if why := why_no_cuda():
            problems.append(f'worker.device = "cuda": {why} (use "auto" or "cpu")')
    warnings = []
    if not config.routes:
        warnings.append("routes: none defined, so every series received would be ignored")
    return problems, warnings


def folder_problem(key: str, folder: Path) -> str | None:
    """Why ``folder`` cannot be the node's folder: a file, not creatable, not writable. Tried
    by writing (a permission check would pass for root on a read-only file system)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{key} = '{folder}': {existing} is a file, not a folder"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        how = "is not writable" if existing == folder else f"cannot be created in {existing}"
        return f"{key} = '{folder}': {how} ({error.strerror})"
    return None


def _database_problem(url: str) -> str | None:
    """A driver that is not installed, or an SQLite file whose folder cannot be made."""
    parsed = make_url(url)
    shown = f"node.database = {parsed.render_as_string(hide_password=True)!r}"
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        return f"{shown}: SQLAlchemy knows no database {parsed.drivername!r}"
    except ImportError as error:
        if parsed.get_backend_name() == "postgresql":
            hint = "pip install 'dicomnode[postgresql]'"
            if parsed.drivername != "postgresql+psycopg":
                hint += " and write the URL as postgresql+psycopg://..."
        else:
            hint = f"install the Python package that provides {error.name}"
        return f"{shown}: its driver {error.name} is not installed ({hint})"
    database = sqlite_file(url)
    return folder_problem("node.database", database.parent) if database else None


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite database URL; None for another database or one in memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _listen_problem(section: str, host: str, port: int) -> str | None:
    """Why a server could not listen on (host, port), tried by binding as servers do."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except PermissionError:
            return (
                f"{section}.port = {port}: not permitted to listen on {host}:{port} (ports "
                "below 1024 need root or CAP_NET_BIND_SERVICE)"
            )
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return f"{section}.port = {port}: {host}:{port} is in use (is a node running?)"
            return f"{section}.host = {host!r}: cannot listen there ({error.strerror})"
    return None


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
    tls = config.node.tls
    if tls is not None:
        tls = tls.model_copy(
            update={
                "certificate": base / tls.certificate,
                "key": base / tls.key,
                "ca": base / tls.ca if tls.ca else None,
            }
        )
    node = config.node.model_copy(
        update={
            "storage": storage,
            "database": url.render_as_string(hide_password=False),
            "tls": tls,
        }
    )
    destinations = {
        name: destination.model_copy(
            update={
                "tls": destination.tls.model_copy(
                    update={
                        field: base / value
                        for field in ("ca", "certificate", "key")
                        if (value := getattr(destination.tls, field)) is not None
                    }
                )
            }
        )
        if destination.tls
        else destination
        for name, destination in config.destinations.items()
    }
    models = config.models.model_copy(update={"registry": registry})
    refresh = config.refresh.model_copy(update={"data": [base / p for p in config.refresh.data]})
    return config.model_copy(
        update={"node": node, "models": models, "refresh": refresh, "destinations": destinations}
    )


def _describe(error: dict[str, Any]) -> str:
    location = _location(error["loc"])
    if error["type"] == "extra_forbidden":
        return _unknown(error["loc"], error["input"])
    if error["type"] == "missing":
        return f"{location}: required, but missing"
    if error["type"] == "int_type" and isinstance(error["input"], str):
        key, text = str(error["loc"][-1]), error["input"].strip()
        example = f"{key} = {text}" if text.isdigit() else f"{key} = 1234"
        return f"{location} = {error['input']!r}: a number, written without quotes ({example})"
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


def _unknown(loc: tuple[Any, ...], value: Any) -> str:
    """An unknown section or key, with the known one it is a near miss of."""
    name = str(loc[-1])
    if len(loc) == 1:
        sections = list(Config.model_fields)
        match = difflib.get_close_matches(name, sections, n=1, cutoff=0.6)
        tables = list(value) if isinstance(value, dict) else []
        if not match:
            return f"[{name}]: unknown section (sections: {', '.join(sections)})"
        if match[0] == "routes":
            hint = "[[routes]]"
        elif match[0] == "destinations" and tables:
            hint = " and ".join(f"[destinations.{table}]" for table in tables)
        else:
            hint = f"[{match[0]}]"
        shown = f"{name}.{tables[0]}" if len(tables) == 1 and match[0] == "destinations" else name
        return f"[{shown}]: unknown section, did you mean {hint}?"
    keys = _known_keys(loc[:-1])
    match = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    hint = (
        f", did you mean {match[0]}?"
        if match
        else " (check its spelling and section in the README's reference)"
    )
    return f"{_location(loc)}: unknown key{hint}"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the settings at ``loc`` (as pydantic names it) know."""
    kind: Any = Config
    for part in loc:
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            field = kind.model_fields.get(str(part))
            if field is None:
                return []
            kind = field.annotation
        else:  # a dict of tables or a list of them: the part is a table's name or index
            kind = typing.get_args(kind)[-1]
    return list(kind.model_fields) if isinstance(kind, type) and issubclass(kind, BaseModel) else []
