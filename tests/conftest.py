"""Shared fixtures: where the real data lives, and small helpers every test uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.paths import MR_BRAIN


@pytest.fixture(scope="session")
def mr_brain() -> Path:
    if not MR_BRAIN.is_dir():
        pytest.fail(f"test data not found at {MR_BRAIN} (set DICOMNODE_TEST_DATA)")
    return MR_BRAIN


@pytest.fixture
def node(tmp_path):
    """A dicomnode (intake only, no worker) on a free loopback port, stopped afterwards."""
    from tests.support.nodeproc import NodeProcess, free_port, write_config

    port = free_port()
    process = NodeProcess(write_config(tmp_path / "node", port), port).start()
    yield process
    process.stop()
