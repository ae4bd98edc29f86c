"""Which filesystem holds a path: SQLite must never live on a network filesystem.

SQLite's locking relies on POSIX locks and a shared-memory file (WAL) that NFS and CIFS
do not provide reliably: two machines writing one database file over them corrupt it
silently. Several machines share PostgreSQL instead (docs/deploy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNTS = Path("/proc/mounts")
# Types of /proc/mounts whose files live on another machine.
NETWORK_TYPES = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs", "9p"}
)
NETWORK_PREFIXES = ("fuse.sshfs", "fuse.glusterfs", "fuse.ceph")


@dataclass(frozen=True)
class Mount:
    point: Path
    type: str

    @property
    def is_network(self) -> bool:
        return self.type in NETWORK_TYPES or self.type.startswith(NETWORK_PREFIXES)


def mount_of(path: Path, mounts: Path = MOUNTS) -> Mount | None:
    """The mount that holds ``path`` (or, for a file not made yet, its nearest existing
    folder); None where the mount table cannot be read (not Linux)."""
    try:
        table = mounts.read_text()
    except OSError:
        return None
    target = Path(path).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best: Mount | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes a space in a mount point as \040.
        point = Path(fields[1].replace("\\040", " "))
        if (target == point or point in target.parents) and (
            best is None or len(point.parts) > len(best.point.parts)
        ):
            best = Mount(point, fields[2])
    return best


def network_filesystem_problem(path: Path, mounts: Path = MOUNTS) -> str | None:
    """Why an SQLite database may not live at ``path``, or None where it may."""
    mount = mount_of(path, mounts)
    if mount is None or not mount.is_network:
        return None
    return (
        f"{path} is on a network filesystem ({mount.type}, mounted at {mount.point}): "
        "SQLite's locking is not reliable there and concurrent writers corrupt the database; "
        "keep SQLite on a local disk, or use PostgreSQL for several machines (docs/deploy.md)"
    )
