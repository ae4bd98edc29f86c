"""The `dicomnode` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from node.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    check_database,
    check_environment,
    check_models,
    folder_problem,
    load_config,
    sqlite_file,
)
from node.logs import LogFormat, setup_logging
from node.version import software_version
from pipeline.dicom.contrast import Direction
from pipeline.state.schema import SchemaError

if TYPE_CHECKING:
    from sqlalchemy.orm import sessionmaker

log = logging.getLogger("dicomnode")


# The ML engineer's commands load torch and the training stack (seconds); the admin's
# quick commands must not wait for that, so these are built only when asked for.
# The config file when --config is not given (else ./config.toml): for a service's
# environment, or an admin's shell profile.
CONFIG_VARIABLE = "DICOMNODE_CONFIG"
GLOBAL_OPTIONS = ("--config", "--log-format")
TRAINING_COMMANDS = {
    "train": "train a model on paired T1/T2 studies and register it",
    "evaluate": "score a model on paired studies, beside the trivial floors",
    "models": "list the registered models, or activate a version",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(training=_command_of(argv) in TRAINING_COMMANDS)
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    args.config = Path(args.config or os.environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG)
    try:
        return args.run(args)
    except ConfigError as error:
        print(error.report(), file=sys.stderr)
        return 2
    except SchemaError as error:
        print(f"database refused: {error}", file=sys.stderr)
        return 2
    except SQLAlchemyError as error:
        # A database that went away or cannot be written: a line for the admin, not a trace.
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        print(f"dicomnode: the database failed: {type(error).__name__}: {reason}", file=sys.stderr)
        return 1
    except OSError as error:
        # A file or folder the command needs and cannot use: the error names it.
        print(f"dicomnode: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _command_of(argv: list[str]) -> str | None:
    """The subcommand's name: the first word that is neither an option nor its value."""
    words = iter(argv)
    for word in words:
        if word in GLOBAL_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _parser(training: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="DICOM node (AE SYNTH) that synthesizes T2 from T1 and T1 from T2 MR series.",
    )
    parser.add_argument("--version", action="version", version=f"dicomnode {software_version()}")
    _add_global_options(parser, defaults=True)
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _add_global_options(sub, defaults=False)
        sub.set_defaults(run=run)
        return sub

    command("serve", _serve, "receive series, synthesize and deliver (runs until stopped)")
    status = command("status", _status, "is the node healthy, what it received, does, failed")
    status.add_argument("--json", action="store_true", help="one JSON object for scripts")
    status.add_argument("--limit", type=int, default=200, help="rows per table (default 200)")
    route = command("route", _route, "dry run: which rule would fire for each series under PATH")
    route.add_argument("path", type=Path, nargs="+", metavar="PATH")
    route.add_argument(
        "--calling-ae", default="", help="assume the series came from this AE (calling_ae rules)"
    )

    quality = command(
        "quality", _quality, "the quality monitor: rolling scores, worst studies, pauses"
    )
    quality.add_argument("--json", action="store_true", help="one JSON object for scripts")
    quality_actions = quality.add_subparsers(metavar="ACTION")
    resume = quality_actions.add_parser(
        "resume", help="resume a protocol the monitor paused (its earlier scores set aside)"
    )
    _add_global_options(resume, defaults=False)
    for name in ("scanner", "protocol", "model"):
        resume.add_argument(f"--{name}", required=True, help="as `dicomnode quality` shows it")
    resume.set_defaults(run=_quality_resume)

    harvest = command("harvest", _harvest_list, "training pairs kept from received studies")
    harvest_actions = harvest.add_subparsers(metavar="ACTION")
    listing = harvest_actions.add_parser("list", help="kept and released pairs (pseudonyms)")
    _add_global_options(listing, defaults=False)
    # Before or after the action: after it, no default that would undo one given before.
    harvest.add_argument("--json", action="store_true", help="one JSON object for scripts")
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    listing.set_defaults(run=_harvest_list)

    command("worker", _worker, "run a synthesis worker only (for [worker] in_process = false)")
    command("check", _check, "C-ECHO each destination and say whether it answers")
    retry = command("retry", _retry, "replay a failed job, or a done job's failed deliveries")
    retry.add_argument("id", type=int, metavar="ID", help="job id (see `dicomnode status`)")
    retry.add_argument("--delivery", action="store_true", help="ID is a delivery id")
    resend = command("resend", _resend, "send a done job's synthetic series again")
    resend.add_argument("job", type=int, metavar="JOB", help="job id (see `dicomnode status`)")
    resend.add_argument(
        "--destination", metavar="NAME", help="only to this destination (default: its route's)"
    )
    reprocess = command("reprocess", _reprocess, "synthesize a series again with the active model")
    reprocess.add_argument("series", metavar="SERIES", help="the received series' instance UID")
    audit = command("audit", _audit, "who sent what, what was made and sent, what admins did")
    which = audit.add_mutually_exclusive_group()
    which.add_argument("--accession", metavar="A", help="only this accession number")
    which.add_argument("--study", metavar="UID", help="only this study instance UID")
    which.add_argument("--destination", metavar="NAME", help="only sends to this destination")
    audit.add_argument("--json", action="store_true", help="one JSON array for scripts")
    audit.add_argument("--limit", type=int, default=1000, help="newest rows (default 1000)")
    translate = command(
        "translate", _translate, "offline: synthesize from a folder of DICOM files into a folder"
    )
    translate.add_argument("input", type=Path, metavar="INPUT")
    translate.add_argument("output", type=Path, metavar="OUTPUT")
    translate.add_argument(
        "--direction",
        choices=[direction.value for direction in Direction],
        help="default: the one each series' classified contrast implies",
    )
    translate.add_argument(
        "--model", type=Path, help="model file (default: the registry's active model)"
    )

    if training:
        from node.train_commands import add_commands

        add_commands(commands, _add_global_options)
    else:
        for name, text in TRAINING_COMMANDS.items():
            commands.add_parser(name, help=text)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(metavar="ACTION")
    check = config_commands.add_parser(
        "check", help="check config.toml, and this machine for it, without starting"
    )
    _add_global_options(check, defaults=False)
    check.set_defaults(run=_config_check)

    database = commands.add_parser("db", help="the database's schema version")
    database_commands = database.add_subparsers(metavar="ACTION")
    for name, run, text in (
        ("version", _db_version, "show the database's schema revision and this node's"),
        ("upgrade", _db_upgrade, "bring the database up to this node's schema revision"),
    ):
        action = database_commands.add_parser(name, help=text, description=text)
        _add_global_options(action, defaults=False)
        action.set_defaults(run=run)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--config and --log-format, accepted before the subcommand and after it. After it they
    have no default, so a subcommand does not overwrite what was given before it."""
    unset = None if defaults else argparse.SUPPRESS
    parser.add_argument(
        "--config",
        type=Path,
        default=unset,
        help=f"config.toml (default: ${CONFIG_VARIABLE}, else ./config.toml)",
    )
    parser.add_argument(
        "--log-format",
        type=LogFormat,
        choices=list(LogFormat),
        default=LogFormat.TEXT if defaults else argparse.SUPPRESS,
        help="text (default) or json (one object a line, for log shippers)",
    )


def _load_checked(path: Path) -> Config:
    """The config and the models its routes name: a missing or damaged model stops the
    command now instead of failing the first job."""
    config = load_config(path)
    _raise_model_problems(config, path)
    return config


def _raise_model_problems(config: Config, path: Path) -> None:
    problems = check_models(config)
    if problems:
        raise ConfigError(path, problems)


def _raise_database_problems(config: Config, path: Path) -> None:
    problems = check_database(config)
    if problems:
        raise ConfigError(path, problems)


def _open_database(config: Config, path: Path, *, create: bool = False) -> sessionmaker:
    """The node's database, once its driver and folder are known to be there: a missing
    driver is a config error naming the key, not an import trace. Without ``create``, an
    SQLite file that is not there is one too: an admin's command run against the wrong
    config would otherwise make an empty database and report that nothing happened."""
    from pipeline.state.db import open_database

    _raise_database_problems(config, path)
    database = sqlite_file(config.node.database)
    if not create and database is not None and not database.exists():
        raise ConfigError(
            path,
            [
                f"node.database = {config.node.database!r}: no such database (the node "
                "makes it when it first starts; is this the node's config?)"
            ],
        )
    return open_database(config.node.database)


def _raise_tls_problems(config: Config, path: Path) -> None:
    from node.tls import check_tls

    problems = check_tls(config)
    if problems:
        raise ConfigError(path, problems)


def _serve(args: argparse.Namespace) -> int:
    from node.receivers import share_counters

    with share_counters():  # before node.metrics imports prometheus_client
        from node.console import ListenError
        from node.service import NodeService

        config = load_config(args.config)
        _raise_database_problems(config, args.config)
        _raise_tls_problems(config, args.config)
        # Without an in-process worker, the models are checked by `dicomnode worker`.
        if config.worker.in_process:
            _raise_model_problems(config, args.config)
        problems, warnings = check_environment(config, worker=config.worker.in_process)
        if problems:
            raise ConfigError(args.config, problems)
        setup_logging(config.node.log_level, args.log_format)
        for warning in warnings:
            log.warning("%s: %s", args.config, warning)
        try:
            NodeService(config, args.log_format).run_until_signalled()
        except ListenError as error:  # taken between the check and the start
            log.error("%s: %s", args.config, error)
            return 2
        except OSError as error:  # the port is taken since the check, the spool cannot be made
            log.error("cannot start: %s", error.strerror or error)
            return 1
    return 0


def _worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from node.service import build_worker, take_back_leases
    from pipeline.state.db import Role
    from pipeline.state.heartbeats import Heart, Pulse

    config = _load_checked(args.config)
    problem = folder_problem("node.storage", config.node.storage)
    if problem:
        raise ConfigError(args.config, [problem])
    setup_logging(config.node.log_level, args.log_format)
    sessions = _open_database(config, args.config, create=True)
    take_back_leases(config, sessions)
    worker = build_worker(config, sessions)
    heart = Heart(
        sessions,
        Role.WORKER,
        software_version(),
        worker.device,
        pulse=lambda: Pulse(current_job_id=worker.current_job),
    )
    heart.start()
    worker.on_job_done = heart.wake.set  # the finished job leaves the processes list at once
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: (stop.set(), worker.wake.set()))
    log.info("worker %s started on %s", worker.owner, worker.device)
    try:
        worker.run_forever(stop)
    finally:
        heart.stop()
    return 0


def _check(args: argparse.Namespace) -> int:
    from node.scu import echo

    config = load_config(args.config)
    _raise_tls_problems(config, args.config)
    if not config.destinations:
        print("no [destinations.NAME] in config")
        return 1
    failures = 0
    for name, destination in config.destinations.items():
        problem = echo(destination, config.delivery, config.node.ae_title)
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        print(f"{name:<16} {where:<36} {'OK' if problem is None else 'FAILED: ' + problem}")
        failures += problem is not None
    return 1 if failures else 0


def _admin_action(args: argparse.Namespace, verb: str, action) -> int:
    """Run ``action(config, sessions, origin)``: print what it did, or why it could not."""
    from pipeline.state.audit import cli_origin

    config = load_config(args.config)
    sessions = _open_database(config, args.config)
    try:
        print(action(config, sessions, cli_origin()))
    except ValueError as error:
        print(f"cannot {verb}: {error}", file=sys.stderr)
        return 1
    return 0


def _retry(args: argparse.Namespace) -> int:
    from pipeline.state.deliveries import retry_delivery
    from pipeline.state.jobs import retry_job

    retry = retry_delivery if args.delivery else retry_job
    return _admin_action(
        args, "retry", lambda config, sessions, origin: retry(sessions, args.id, origin=origin)
    )


def _resend(args: argparse.Namespace) -> int:
    from pipeline.state.deliveries import resend_job

    return _admin_action(
        args,
        "resend",
        lambda config, sessions, origin: resend_job(
            sessions, args.job, args.destination, config.destinations, origin=origin
        ),
    )


def _reprocess(args: argparse.Namespace) -> int:
    from pipeline.state.jobs import reprocess_series

    return _admin_action(
        args,
        "reprocess",
        lambda config, sessions, origin: reprocess_series(sessions, args.series, origin=origin),
    )


def _audit(args: argparse.Namespace) -> int:
    from node.status import format_audit
    from pipeline.state.audit import AuditFilter, read_audit

    config = load_config(args.config)
    where = AuditFilter(accession=args.accession, study=args.study, destination=args.destination)
    rows = read_audit(_open_database(config, args.config), where, limit=args.limit)
    print(json.dumps(rows, indent=1) if args.json else format_audit(rows))
    return 0


def _translate(args: argparse.Namespace) -> int:
    from pipeline.dicom.seriesfiles import scan_series
    from pipeline.model.registry import ModelRegistry
    from pipeline.synthesis import translate_series

    setup_logging("WARNING", args.log_format)
    for path, role in ((args.input, "INPUT"), (args.output, "OUTPUT")):
        if path.exists() and not path.is_dir():
            print(f"translate: {role} {path} is a file; give a folder", file=sys.stderr)
            return 1
    if not args.input.exists():
        print(f"translate: INPUT {args.input} does not exist", file=sys.stderr)
        return 1
    # Before minutes of synthesis, not after them.
    problem = folder_problem("OUTPUT", args.output)
    if problem:
        print(f"translate: {problem}", file=sys.stderr)
        return 1
    registry = None if args.model else ModelRegistry(load_config(args.config).models.registry)

    def model_for(direction: Direction) -> Path:
        return args.model or registry.active_path(direction.value)

    found = scan_series([args.input])
    forced = Direction(args.direction) if args.direction else None
    failures = 0
    for done in translate_series(found.series, args.output, model_for, software_version(), forced):
        series, classification = done.series, done.classification
        label = f"{series.folder} ({series.header.get('SeriesDescription', '')})"
        if done.direction is None:
            print(
                f"skipped {label}: contrast {classification.contrast}, neither T1 nor T2 "
                f"({classification.reason}); give --direction to force one"
            )
        elif done.error is not None:
            print(f"failed  {label}: {done.error}")
            failures += 1
        else:
            print(
                f"wrote   {done.folder}: {len(done.result.datasets)} {done.result.source_plane} "
                f"synthetic {done.direction.target} slice(s) from {label}"
            )
            if (note := done.result.overshoot_note()) is not None:
                print(f"        check it before use: {note}")
    for path, reason in found.unreadable:
        print(f"skipped {path}: {reason}")
    if not found.series:
        print(f"no DICOM series found under {args.input}")
        return 1
    return 1 if failures else 0


def _status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from node.health import check_health
    from node.status import collect_status, format_status

    config = load_config(args.config)
    sessions = _open_database(config, args.config)
    verdict = check_health(config, sessions)
    status = collect_status(sessions, limit=args.limit, monitor=config.monitor)
    if args.json:
        print(json.dumps({"health": asdict(verdict), **status}, indent=1))
    else:
        print(f"{verdict.line()}\n\n{format_status(status)}")
    return 0


def _quality(args: argparse.Namespace) -> int:
    from node.quality import format_quality
    from pipeline.state.quality import quality_report

    config = load_config(args.config)
    report = quality_report(_open_database(config, args.config), config.monitor)
    print(json.dumps(report, indent=1) if args.json else format_quality(report))
    return 0


def _quality_resume(args: argparse.Namespace) -> int:
    from pipeline.state.audit import cli_origin
    from pipeline.state.quality import NoScores, resume

    config = load_config(args.config)
    sessions = _open_database(config, args.config)
    try:
        known = resume(sessions, args.scanner, args.protocol, args.model, origin=cli_origin())
    except NoScores as error:
        print(f"quality resume: {error}", file=sys.stderr)
        return 1
    print(
        f"resumed protocol {args.protocol!r} on {args.scanner} with model {args.model}: its "
        f"{known} earlier score(s) no longer pause it"
    )
    return 0


def _harvest_list(args: argparse.Namespace) -> int:
    from node.tables import table
    from pipeline.harvest import list_harvested

    config = load_config(args.config)
    listing = list_harvested(_open_database(config, args.config))
    if args.json:
        print(json.dumps(listing, indent=1))
        return 0
    state = "on" if config.harvest.enabled else "off ([harvest] enabled = false)"
    print(
        f"HARVEST {state}: {listing['kept']} pair(s) kept, {listing['kept_bytes'] / 2**20:.1f} "
        f"MiB (caps: {config.harvest.max_pairs} pairs, {config.harvest.max_gib:g} GiB)"
    )
    rows = [
        (
            p["id"],
            p["patient"],
            p["study_uid"],
            p["files"],
            p["harvested_at"],
            p["released_at"] or "",
        )
        for p in listing["pairs"]
    ]
    headers = ("id", "patient", "study UID", "files", "harvested", "released")
    print(table(headers, [tuple("" if v is None else v for v in row) for row in rows]))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from node.tls import check_tls

    config = load_config(args.config)
    problems, warnings = check_environment(config, worker=config.worker.in_process)
    problems += check_database(config) + check_models(config) + check_tls(config)
    for warning in warnings:
        print(f"{args.config}: warning: {warning}")
    if problems:
        raise ConfigError(args.config, problems)
    print(
        f"{args.config}: OK ({len(config.routes)} route(s), "
        f"{len(config.destinations)} destination(s))"
    )
    return 0


def _db_version(args: argparse.Namespace) -> int:
    from pipeline.state.db import create_database_engine
    from pipeline.state.schema import schema_version

    config = load_config(args.config)
    _raise_database_problems(config, args.config)
    print(schema_version(create_database_engine(config.node.database)).text)
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    from pipeline.state.db import create_database_engine
    from pipeline.state.schema import upgrade_schema

    config = load_config(args.config)
    _raise_database_problems(config, args.config)
    before, after = upgrade_schema(create_database_engine(config.node.database))
    print(
        f"schema revision {after}: already up to date"
        if before == after
        else f"schema upgraded from revision {before} to {after}"
    )
    return 0


def _route(args: argparse.Namespace) -> int:
    from pipeline.dicom.contrast import classify
    from pipeline.dicom.seriesfiles import scan_series
    from pipeline.routing import header_keywords, select_route

    config = load_config(args.config)
    missing = [str(path) for path in args.path if not path.exists()]
    if missing:
        print("route: no such file or folder: " + ", ".join(missing), file=sys.stderr)
        return 1
    found = scan_series(args.path, header_keywords(config.routes))
    for path, reason in found.unreadable:
        print(f"skipped {path}: {reason}")
    if not found.series:
        print("no DICOM series found under " + ", ".join(map(str, args.path)), file=sys.stderr)
        return 1
    for entry in found.series:
        classification = classify(entry.header)
        decision = select_route(
            config.routes, classification.contrast, entry.header, args.calling_ae
        )
        print(f"{entry.folder}  ({len(entry.files)} instance(s), series {entry.series_uid})")
        print(f"  description: {entry.header.get('SeriesDescription', '')}")
        print(f"  contrast:    {classification.contrast} ({classification.reason})")
        if decision.route is None:
            print(f"  ignored:     {decision.reason}")
        else:
            route = decision.route
            print(f"  route:       {route.name} -> {route.direction} with model {route.model_name}")
            for name in route.destinations:
                d = config.destinations[name]
                print(f"  destination: {name} ({d.ae_title}@{d.host}:{d.port})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
