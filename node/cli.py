"""The `dicomnode` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from node.config import DEFAULT_CONFIG, ConfigError, load_config

log = logging.getLogger("dicomnode")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ConfigError as error:
        print(error.report(), file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnode",
        description="DICOM node (AE SYNTH) that synthesizes T2 from T1 and T1 from T2 MR series.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, run, help: str) -> argparse.ArgumentParser:  # noqa: A002
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument(
            "--config", type=Path, default=DEFAULT_CONFIG, help="config.toml (default: ./config.toml)"
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
        "--calling-ae", default="", help="assume the series came from this AE (for calling_ae rules)"
    )

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
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from node.service import NodeService

    config = load_config(args.config)
    _setup_logging(config.node.log_level)
    service = NodeService(config)
    service.run_until_signalled()
    return 0


def _status(args: argparse.Namespace) -> int:
    from node.status import collect_status, format_status
    from pipeline.db import open_database

    config = load_config(args.config)
    status = collect_status(open_database(config.node.database), limit=args.limit)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(
        f"{args.config}: OK ({len(config.routes)} route(s), "
        f"{len(config.destinations)} destination(s))"
    )
    return 0


def _route(args: argparse.Namespace) -> int:
    from pipeline.contrast import classify
    from pipeline.routing import header_keywords, select_route
    from pipeline.seriesfiles import scan_series

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
