"""The code base stays as ruff (configured in pyproject.toml) wants it."""

import subprocess
import sys

from tests.support.paths import REPO


def test_ruff_check_and_format():
    ruff = [sys.executable, "-m", "ruff"]
    check = subprocess.run([*ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    form = subprocess.run(
        [*ruff, "format", "--check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert form.returncode == 0, form.stdout
