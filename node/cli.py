"""The `dicomnode` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from node.config import DEFAULT_CONFIG, Config, ConfigError, check_models, load_config
from pipeline.dicom.contrast import Direction
from pipeline.redact import RedactingFilter

log = logging.getLogger("dicomnode")


# The ML engineer's commands load torch and the training stack (seconds); the admin's
# quick commands must not wait for that, so these are built only when asked for.
TRAINING_COMMANDS = {
    "train": "train a model on paired T1/T2 studies and register it",
    "evaluate": "score a model on paired studies, beside the trivial floors",
    "models": "list the registered models, or activate a version",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(training=bool(argv) and argv[0] in TRAINING_COMMANDS)
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ConfigError as error:
        print(error.report(), file=sys.stderr)
        return 2


def _parser(training: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="DICOM node (AE SYNTH) that synthesizes T2 from T1 and T1 from T2 MR series.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--config", type=Path, default=DEFAULT_CONFIG, help="default: ./config.toml"
        )
        sub.set_defaults(run=run)
        return sub

    command("serve", _serve, "receive series, synthesize and deliver (runs until stopped)")
    status = command("status", _status, "what the node received, is doing, and what failed")
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
    resume.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    for name in ("scanner", "protocol", "model"):
        resume.add_argument(f"--{name}", required=True, help="as `dicomnode quality` shows it")
    resume.set_defaults(run=_quality_resume)

    harvest = command("harvest", _harvest_list, "training pairs kept from received studies")
    harvest_actions = harvest.add_subparsers(metavar="ACTION")
    listing = harvest_actions.add_parser("list", help="kept and released pairs (pseudonyms)")
    listing.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    for sub in (harvest, listing):
        sub.add_argument("--json", action="store_true", help="one JSON object for scripts")
    listing.set_defaults(run=_harvest_list)

    command("worker", _worker, "run a synthesis worker only (for [worker] in_process = false)")
    command("check", _check, "C-ECHO each destination and say whether it answers")
    retry = command("retry", _retry, "replay a failed job, or a done job's failed deliveries")
    retry.add_argument("id", type=int, metavar="ID", help="job id (see `dicomnode status`)")
    retry.add_argument("--delivery", action="store_true", help="ID is a delivery id")
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

        add_commands(commands)
    else:
        for name, text in TRAINING_COMMANDS.items():
            commands.add_parser(name, help=text)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(metavar="ACTION")
    check = config_commands.add_parser("check", help="check config.toml without starting")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    check.set_defaults(run=_config_check)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom's own INFO lines repeat ours and, at DEBUG, dump whole datasets (patient
    # names included): keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its state machine's errors are exceptions it raises next: node.acceptor catches them
    # and logs one line each, so its own two lines per exception would only repeat it.
    logging.getLogger("pynetdicom.fsm").setLevel(logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # Libraries quote the values they warn about, and a malformed value can hold a patient's
    # name: their records and Python's warnings go through the handler's redaction.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    logging.captureWarnings(True)
    # pydicom logs each warning it also issues as a Python warning: once is enough.
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


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


def _serve(args: argparse.Namespace) -> int:
    from node.service import NodeService

    config = load_config(args.config)
    # Without an in-process worker, the models are checked by `dicomnode worker`.
    if config.worker.in_process:
        _raise_model_problems(config, args.config)
    _setup_logging(config.node.log_level)
    NodeService(config).run_until_signalled()
    return 0


def _worker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from node.service import build_worker, take_back_leases
    from pipeline.state.db import open_database

    config = _load_checked(args.config)
    _setup_logging(config.node.log_level)
    sessions = open_database(config.node.database)
    take_back_leases(config, sessions)
    worker = build_worker(config, sessions)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: (stop.set(), worker.wake.set()))
    log.info("worker %s started", worker.owner)
    worker.run_forever(stop)
    return 0


def _check(args: argparse.Namespace) -> int:
    from node.scu import echo

    config = load_config(args.config)
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


def _retry(args: argparse.Namespace) -> int:
    from pipeline.state.db import open_database
    from pipeline.state.deliveries import retry_delivery
    from pipeline.state.jobs import retry_job

    config = load_config(args.config)
    sessions = open_database(config.node.database)
    try:
        print(retry_delivery(sessions, args.id) if args.delivery else retry_job(sessions, args.id))
    except ValueError as error:
        print(f"cannot retry: {error}", file=sys.stderr)
        return 1
    return 0


def _translate(args: argparse.Namespace) -> int:
    from node.service import software_version
    from pipeline.dicom.seriesfiles import scan_series
    from pipeline.model.registry import ModelRegistry
    from pipeline.synthesis import translate_series

    _setup_logging("WARNING")
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
    for path, reason in found.unreadable:
        print(f"skipped {path}: {reason}")
    if not found.series:
        print(f"no DICOM series found under {args.input}")
        return 1
    return 1 if failures else 0


def _status(args: argparse.Namespace) -> int:
    from node.status import collect_status, format_status
    from pipeline.state.db import open_database

    config = load_config(args.config)
    sessions = open_database(config.node.database)
    status = collect_status(sessions, limit=args.limit, monitor=config.monitor)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def _quality(args: argparse.Namespace) -> int:
    from node.quality import format_quality
    from pipeline.state.db import open_database
    from pipeline.state.quality import quality_report

    config = load_config(args.config)
    report = quality_report(open_database(config.node.database), config.monitor)
    print(json.dumps(report, indent=1) if args.json else format_quality(report))
    return 0


def _quality_resume(args: argparse.Namespace) -> int:
    from pipeline.state.db import open_database
    from pipeline.state.quality import resume

    config = load_config(args.config)
    known = resume(open_database(config.node.database), args.scanner, args.protocol, args.model)
    if not known:
        print(
            f"quality resume: no scores for protocol {args.protocol!r} on {args.scanner} with "
            f"model {args.model} (see dicomnode quality)",
            file=sys.stderr,
        )
        return 1
    print(
        f"resumed protocol {args.protocol!r} on {args.scanner} with model {args.model}: its "
        f"{known} earlier score(s) no longer pause it"
    )
    return 0


def _harvest_list(args: argparse.Namespace) -> int:
    from node.tables import table
    from pipeline.harvest import list_harvested
    from pipeline.state.db import open_database

    config = load_config(args.config)
    listing = list_harvested(open_database(config.node.database))
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
    config = _load_checked(args.config)
    print(
        f"{args.config}: OK ({len(config.routes)} route(s), "
        f"{len(config.destinations)} destination(s))"
    )
    return 0


def _route(args: argparse.Namespace) -> int:
    from pipeline.dicom.contrast import classify
    from pipeline.dicom.seriesfiles import scan_series
    from pipeline.routing import header_keywords, select_route

    config = load_config(args.config)
    found = scan_series(args.path, header_keywords(config.routes))
    if not found.series:
        print("no DICOM series found under " + ", ".join(map(str, args.path)))
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
    for path, reason in found.unreadable:
        print(f"skipped {path}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
