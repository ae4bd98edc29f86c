"""Who holds a lease: a process, named by its host, its pid and when it started.

A pid alone does not name a process: after a crash and a restart, or a reboot, the same
pid may belong to another process, the dead one's own successor included. Linux gives a
process its start time (clock ticks since boot, field 22 of /proc/<pid>/stat) and each boot
an id (/proc/sys/kernel/random/boot_id); with the pid they name one process for good.
Where /proc is missing, the start is unknown and a holder counts as alive while a process
of its pid exists.

A process can tell only whether a process of its own host is alive: a lease held on
another host runs out by itself (PostgreSQL shared by several machines).

Jobs and deliveries are both held this way, and both are claimed and taken back through
``claim_oldest`` and ``take_back``.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from pipeline.state.db import Leased, utcnow

log = logging.getLogger(__name__)

PROC = Path("/proc")
# Rows read per claim: of several holders that read the same oldest row, those that lose it
# try the next ones instead of coming back empty.
CANDIDATES = 5

Row = TypeVar("Row", bound=Leased)


class Holder(enum.StrEnum):
    """What can be told of a lease's holder from this process."""

    ALIVE = "alive"
    GONE = "gone"  # no such process on this host any more: its lease can be taken back
    ELSEWHERE = "elsewhere"  # on another host: its lease runs out by itself


@dataclass(frozen=True)
class ProcessIdentity:
    """One process of one machine, for good."""

    host: str
    pid: int
    start: str | None  # "<boot id>/<start ticks>"; None where /proc cannot say


def worker_identity() -> str:
    """Who holds a lease, for people: host, process and thread, so an admin can find it."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


def _lease_values(owner: str, expires_at: datetime) -> dict[str, Any]:
    """The lease columns of a row this process claims for ``owner`` (pipeline.state.db.Leased)."""
    process = this_process()
    return {
        "lease_owner": owner,
        "lease_expires_at": expires_at,
        "lease_host": process.host,
        "lease_pid": process.pid,
        "lease_process_start": process.start,
    }


def claim_oldest(
    session: Session,
    table: type[Row],
    *,
    owner: str,
    lease_seconds: float,
    now: datetime,
    waiting: str,
    due_at: InstrumentedAttribute[datetime | None],
    held: str,
    changes: Callable[[Row], dict[str, Any]],
) -> Row | None:
    """Take the oldest claimable row of ``table`` for ``owner``, in the caller's transaction:
    one ``waiting`` and due (``due_at`` passed or unset), or one ``held`` under a lease that
    expired. It becomes ``held`` under ``owner``'s lease, with the other columns ``changes``
    gives for the row as it was read.

    The conditional UPDATE (the row still in the state it was read in, and still
    claimable) makes the claim exclusive on any database: of several holders that pick the
    same row, exactly one changes it. On PostgreSQL the candidates are read ``FOR UPDATE
    SKIP LOCKED``: workers on several machines each get other rows at once instead of
    queueing behind the one that locked the oldest (SQLite has one writer at a time anyway).
    """
    claimable = or_(
        and_(table.state == waiting, or_(due_at.is_(None), due_at <= now)),
        and_(table.state == held, table.lease_expires_at < now),
    )
    lease = _lease_values(owner, now + timedelta(seconds=lease_seconds))
    candidates = select(table).where(claimable).order_by(table.id).limit(CANDIDATES)
    if session.get_bind().dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    for row in session.scalars(candidates).all():
        taken = session.execute(
            update(table)
            .where(table.id == row.id, table.state == row.state, claimable)
            .values(state=held, **lease, updated_at=now, **changes(row))
            .execution_options(synchronize_session=False)
        ).rowcount
        if taken:
            session.refresh(row)
            return row
    return None


def take_back(
    sessions: sessionmaker,
    table: type[Row],
    held: str,
    put_back: Callable[[Row, str | None], str],
) -> list[int]:
    """At start: the rows of ``table`` ``held`` by a process of this host that is gone
    (killed, crashed) are taken back now instead of when their leases run out. Each is
    released, then ``put_back(row, its holder)`` makes it waiting again or failed and says
    why, for the log. Returns the ids taken back."""
    now = utcnow()
    taken = []
    with sessions.begin() as session:
        held_here = select(table).where(
            table.state == held, table.lease_host == this_process().host
        )
        for row in session.scalars(held_here).all():
            if holder_of(row) is not Holder.GONE:
                continue
            holder, expired = row.lease_owner, row.lease_expires_at
            row.release_lease()
            row.updated_at = now
            why = put_back(row, holder)
            log.warning(
                "%s %d: taken back, %s (its lease ran to %s UTC): %s",
                table.__tablename__,
                row.id,
                why,
                expired.isoformat(sep=" ", timespec="seconds") if expired else "?",
                row.state,
            )
            taken.append(row.id)
    return taken


def holder_of(row: Leased) -> Holder:
    """Whether the process holding ``row``'s lease still runs."""
    return holder_state(row.lease_host, row.lease_pid, row.lease_process_start)


def this_process() -> ProcessIdentity:
    """The calling process (its pid changes across a fork, its identity with it)."""
    return _identity(os.getpid())


@cache
def _identity(pid: int) -> ProcessIdentity:
    return ProcessIdentity(socket.gethostname(), pid, _started(pid))


def holder_state(host: str | None, pid: int | None, start: str | None) -> Holder:
    """Whether the process recorded as (``host``, ``pid``, ``start``) still runs."""
    if host != socket.gethostname() or pid is None:
        return Holder.ELSEWHERE
    if not (PROC / "self" / "stat").exists():
        return Holder.ALIVE if _pid_exists(pid) else Holder.GONE
    now = _started(pid)
    if now is None:
        return Holder.GONE
    # Without a recorded start a reused pid cannot be told from the holder: assume it is.
    return Holder.ALIVE if start is None or now == start else Holder.GONE


def _started(pid: int) -> str | None:
    """``<boot id>/<start ticks>`` of a running process, None if none runs under ``pid``
    (a zombie has died: only its exit status is left) or /proc cannot say."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name, in parentheses, may hold spaces: the fields follow its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return f"{_boot_id()}/{fields[19]}"  # field 22 is the 20th after the name


@cache
def _boot_id() -> str:
    try:
        return (PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
