"""deploy/'s systemd units: systemd-analyze verify finds nothing to say about them, with
the install paths pointed at this checkout's dicomnode (verify checks the program exists)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

UNITS = sorted((REPO / "deploy").glob("*.service"))
INSTALLED = "/opt/dicomnode/.venv/bin/dicomnode"


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_units_pass_systemd_analyze_verify(unit, tmp_path):
    text = unit.read_text()
    assert INSTALLED in text and "User=dicomnode" in text and "Restart=on-failure" in text
    here = tmp_path / unit.name
    here.write_text(text.replace(INSTALLED, str(Path(sys.executable).parent / "dicomnode")))
    result = verify(here)
    assert result.returncode == 0 and unit.name not in result.stderr, result.stderr

    # The check reads what it is given: a misspelt key is reported.
    here.write_text(here.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert "Unknown key 'NoNewPrivilege'" in verify(here).stderr


def test_there_are_units_for_serve_and_worker():
    commands = {
        line.rsplit(" ", 1)[-1]
        for u in UNITS
        for line in u.read_text().splitlines()
        if line.startswith("ExecStart=")
    }
    assert commands == {"serve", "worker"}
