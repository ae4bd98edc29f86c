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


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (initdb + pg_ctl in a temporary folder)."""
    from tests.support.postgres import PostgresServer, server_binaries

    binaries = server_binaries()
    if binaries is None:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under "
            "/usr/lib/postgresql/*/bin: install Debian's postgresql (scripts/setup.sh --test)"
        )
    server = PostgresServer(binaries).start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """The SQLAlchemy URL of a new, empty database on the session's PostgreSQL server."""
    import uuid

    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")
