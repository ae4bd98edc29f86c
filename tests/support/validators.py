"""The judges of what the node writes."""

from __future__ import annotations

import subprocess
from pathlib import Path


def assert_dciodvfy_finds_no_error(paths: list[Path]) -> None:
    """dicom3tools' dciodvfy reports no Error line for any of ``paths`` (warnings allowed)."""
    for path in paths:
        report = subprocess.run(
            ["dciodvfy", str(path)], capture_output=True, text=True, check=False
        )
        lines = (report.stdout + report.stderr).splitlines()
        assert [line for line in lines if line.startswith("Error")] == [], path.name
