"""The installed dicomnode's version: on the command line, in logs, cards and the console."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def software_version() -> str:
    try:
        return version("dicomnode")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"
