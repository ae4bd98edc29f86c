"""SQLite is refused on a network filesystem; several machines share PostgreSQL instead."""

from __future__ import annotations

from pathlib import Path

from node.config import check_database, parse_config
from pipeline.state.filesystems import mount_of, network_filesystem_problem


def mounts_table(tmp_path: Path, shared: Path, kind: str) -> Path:
    """A mount table in /proc/mounts' format: the root on ext4, ``shared`` on ``kind``."""
    table = tmp_path / "mounts"
    table.write_text(
        "/dev/sda1 / ext4 rw,relatime 0 0\n"
        "proc /proc proc rw 0 0\n"
        f"server:/export {shared} {kind} rw,vers=4.2 0 0\n"
    )
    return table


def test_sqlite_on_nfs_or_cifs_is_refused_with_the_reason(tmp_path):
    shared = tmp_path / "shared"
    (shared / "var").mkdir(parents=True)
    for kind in ("nfs4", "nfs", "cifs", "smb3"):
        table = mounts_table(tmp_path, shared, kind)
        problem = network_filesystem_problem(shared / "var" / "dicomnode.sqlite", table)
        assert problem is not None
        assert f"network filesystem ({kind}, mounted at {shared})" in problem
        assert "PostgreSQL" in problem


def test_sqlite_on_a_local_disk_is_accepted(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    table = mounts_table(tmp_path, shared, "nfs4")
    # Beside the network mount, not under it; a file not made yet is judged by its folder.
    assert network_filesystem_problem(tmp_path / "local" / "node.sqlite", table) is None
    assert mount_of(tmp_path / "local" / "node.sqlite", table).type == "ext4"
    assert mount_of(shared / "new" / "node.sqlite", table).point == shared


def test_the_node_checks_its_own_database_against_this_machines_mounts(tmp_path):
    local = parse_config({"node": {"database": "sqlite:///var/node.sqlite"}}, tmp_path / "c.toml")
    assert check_database(local) == []  # the test's folder is on a local disk
    remote = parse_config(
        {"node": {"database": "postgresql+psycopg://dicomnode@db.example/dicomnode"}},
        tmp_path / "c.toml",
    )
    assert check_database(remote) == []
