"""The judges of what the node writes."""

from __future__ import annotations

import subprocess
from pathlib import Path

# Debian's dicom3tools (2022) predate Synthetic Data (0008,001C), which every synthetic
# image carries: this error, and no other, is expected until the validator knows the tag.
UNKNOWN_SYNTHETIC_DATA = (
    "Error - Attribute with an even group number is not a recognized standard attribute - "
    "(0x0008,0x001c)  ? "
)


def assert_dciodvfy_finds_no_error(paths: list[Path]) -> None:
    """dicom3tools' dciodvfy reports no Error line for any of ``paths`` (warnings allowed)
    but its not knowing Synthetic Data."""
    for path in paths:
        report = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        lines = (report.stdout + report.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert [line for line in errors if line != UNKNOWN_SYNTHETIC_DATA] == [], path.name
