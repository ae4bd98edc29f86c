"""Shared fixtures: where the real data lives, and small helpers every test uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real brain MRI lives beside the checkout (CI has it there too); it is never copied in.
MR_BRAIN = Path(os.environ.get("DICOMNODE_TEST_DATA", REPO.parent / "shared" / "data" / "mr-brain"))


@pytest.fixture(scope="session")
def mr_brain() -> Path:
    if not MR_BRAIN.is_dir():
        pytest.fail(f"test data not found at {MR_BRAIN} (set DICOMNODE_TEST_DATA)")
    return MR_BRAIN


@pytest.fixture
def node(tmp_path):
    """A dicomnode (intake only, no worker) on a free loopback port, stopped afterwards."""
    from tests.nodeproc import NodeProcess, free_port, write_config

    port = free_port()
    process = NodeProcess(write_config(tmp_path / "node", port), port).start()
    yield process
    process.stop()
