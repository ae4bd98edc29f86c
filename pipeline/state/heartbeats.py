"""Heartbeats: each process of the node (`serve`, every `dicomnode worker`) says every few
seconds that it is alive, what it runs on and which job it holds.

A process is named as a lease names its holder (``leases.this_process``: host, pid, start),
so the holder of a running job or a delivery being sent is found here, and an admin sees
whether it still beats. A process of this host that is gone is known at once (/proc); one of
another host is known only by its silence.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from pipeline.state.db import Heartbeat, Leased, Role, iso, utcnow
from pipeline.state.leases import Holder, holder_of, holder_state, this_process

log = logging.getLogger(__name__)

BEAT_SECONDS = 5.0
# Six beats missed: a process this silent is hung, or dead on another host.
SILENT_AFTER = timedelta(seconds=30)
# Rows of processes that stopped or died are history for this long (the console's list).
KEEP = timedelta(days=7)
SHOWN = timedelta(days=1)


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    SILENT = "silent"  # no beat for SILENT_AFTER: hung, or gone on another host
    GONE = "gone"  # its process no longer runs (this host): a start here takes its work back
    STOPPED = "stopped"  # stopped cleanly


@dataclass(frozen=True)
class Pulse:
    """What a process reports with each beat."""

    current_job_id: int | None = None
    ticked_at: datetime | None = None  # serve: its last completion tick that ran through


def liveness(beat: Heartbeat, now: datetime | None = None) -> Liveness:
    if beat.stopped_at is not None:
        return Liveness.STOPPED
    if holder_state(beat.host, beat.pid, beat.process_start) is Holder.GONE:
        return Liveness.GONE
    if (now or utcnow()) - beat.beat_at > SILENT_AFTER:
        return Liveness.SILENT
    return Liveness.ALIVE


class Heart:
    """Writes this process's heartbeat row now and every BEAT_SECONDS, in its own thread."""

    def __init__(
        self,
        sessions: sessionmaker,
        role: Role,
        version: str,
        device: str | None,
        pulse: Callable[[], Pulse] = Pulse,
        console_url: str | None = None,
    ) -> None:
        self._sessions = sessions
        self._pulse = pulse
        self._stop = threading.Event()
        self.wake = threading.Event()  # beat now (a first tick should show at once)
        self._thread: threading.Thread | None = None
        process = this_process()
        now = utcnow()
        with sessions.begin() as session:
            session.execute(delete(Heartbeat).where(Heartbeat.beat_at < now - KEEP))
            row = Heartbeat(
                role=role,
                host=process.host,
                pid=process.pid,
                process_start=process.start,
                version=version,
                device=device,
                started_at=now,
                beat_at=now,
                console_url=console_url,
            )
            session.add(row)
        self.id = row.id

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Say that this process stopped cleanly (a dead one cannot)."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._sessions.begin() as session:
            row = session.get(Heartbeat, self.id)
            if row is not None:
                row.stopped_at = utcnow()
                row.current_job_id = None

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.beat()
            except SQLAlchemyError as error:
                if not failing:  # once per streak: a locked database would flood the log
                    log.warning("heartbeat not written: %s", type(error).__name__)
                failing = True
            else:
                failing = False
            self.wake.wait(BEAT_SECONDS)
            self.wake.clear()

    def beat(self) -> None:
        pulse = self._pulse()
        with self._sessions.begin() as session:
            row = session.get(Heartbeat, self.id)
            row.beat_at = utcnow()
            row.current_job_id = pulse.current_job_id
            row.ticked_at = pulse.ticked_at


def read_heartbeats(sessions: sessionmaker, now: datetime | None = None) -> list[dict[str, Any]]:
    """Processes that beat in the last day, newest start first, with their liveness."""
    now = now or utcnow()
    with sessions() as session:
        rows = session.scalars(
            select(Heartbeat)
            .where(Heartbeat.beat_at >= now - SHOWN)
            .order_by(Heartbeat.started_at.desc(), Heartbeat.id.desc())
        ).all()
    return [
        {
            "id": row.id,
            "role": row.role,
            "host": row.host,
            "pid": row.pid,
            "process_start": row.process_start,
            "device": row.device,
            "version": row.version,
            "started_at": iso(row.started_at),
            "beat_at": iso(row.beat_at),
            "ticked_at": iso(row.ticked_at),
            "current_job_id": row.current_job_id,
            "console_url": row.console_url,
            "liveness": liveness(row, now),
        }
        for row in rows
    ]


def worker_alive(beats: list[dict[str, Any]]) -> bool:
    """Whether a process that synthesizes (it has a device) beats: queued jobs get done."""
    return any(beat["device"] and beat["liveness"] == Liveness.ALIVE for beat in beats)


def lease_liveness(row: Leased, beats: list[dict[str, Any]]) -> Liveness | None:
    """Whether the holder of ``row``'s lease still beats; None when it is unknown (a holder
    of another host that never wrote a heartbeat)."""
    identity = (row.lease_host, row.lease_pid, row.lease_process_start)
    for beat in beats:
        if (beat["host"], beat["pid"], beat["process_start"]) == identity:
            return beat["liveness"]
    holder = holder_of(row)
    return {Holder.ALIVE: Liveness.ALIVE, Holder.GONE: Liveness.GONE}.get(holder)
