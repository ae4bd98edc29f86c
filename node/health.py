"""The node's health, one verdict for /health and `dicomnode status`: healthy only when the
database is writable, the spool's disk has room, the scheduler ticks and, where jobs are
queued, a worker is alive to take them."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node.config import Config
from pipeline.state.db import Heartbeat, Role, utcnow
from pipeline.state.heartbeats import Liveness, read_heartbeats, worker_alive
from pipeline.state.jobs import read_queue

# The completion tick runs every check_interval_seconds; this many missed means it is stuck.
MISSED_TICKS = 10
# ... but never stricter than this: a tick waits on a busy database now and then.
TICK_SLACK = timedelta(seconds=30)


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    running: bool  # a `dicomnode serve` beats
    reasons: tuple[str, ...]  # why not healthy, one line each

    def line(self) -> str:
        return "healthy" if self.healthy else "UNHEALTHY: " + "; ".join(self.reasons)


def check_health(config: Config, sessions: sessionmaker, serve_id: int | None = None) -> Verdict:
    """The verdict; ``serve_id``: the heartbeat row of the asking `serve` (else the newest
    live one's)."""
    try:
        beats = read_heartbeats(sessions)
        with sessions() as session:
            queued = read_queue(session).depth
    except SQLAlchemyError as error:
        return Verdict(False, False, (f"database: cannot be read ({_short(error)})",))
    alive = [beat for beat in beats if beat["liveness"] == Liveness.ALIVE]
    serve = next(
        (b for b in alive if b["role"] == Role.SERVE and serve_id in (None, b["id"])), None
    )
    reasons = []
    if serve is None:
        last = next((b["beat_at"] for b in beats if b["role"] == Role.SERVE), None)
        reasons.append(
            "the node is not running (no live `dicomnode serve`"
            + (f"; its last beat was at {last})" if last else ")")
        )
    else:
        reasons += filter(
            None, [_write_problem(sessions, serve["id"]), _tick_problem(config, serve)]
        )
    reasons += filter(None, [_spool_problem(config)])
    if queued and not worker_alive(beats):
        reasons.append(
            f"jobs: {queued} queued and no live worker to run them "
            "(start `dicomnode worker`, or [worker] in_process = true)"
        )
    return Verdict(not reasons, serve is not None, tuple(reasons))


def _write_problem(sessions: sessionmaker, beat_id: int) -> str | None:
    """A real write, rolled into the heartbeat row: a read-only or locked database fails it."""
    try:
        with sessions.begin() as session:
            session.execute(
                update(Heartbeat).where(Heartbeat.id == beat_id).values(beat_at=Heartbeat.beat_at)
            )
    except SQLAlchemyError as error:
        return f"database: not writable ({_short(error)})"
    return None


def _tick_problem(config: Config, serve: dict[str, Any]) -> str | None:
    every = config.completion.check_interval_seconds
    allowed = max(TICK_SLACK, timedelta(seconds=every * MISSED_TICKS))
    ticked = _parse(serve["ticked_at"]) or _parse(serve["started_at"])
    if utcnow() - ticked > allowed:
        return (
            f"scheduler: the completion check last ran through at {ticked:%Y-%m-%d %H:%M:%S} "
            f"UTC (it runs every {every:g} s)"
        )
    return None


def _spool_problem(config: Config) -> str | None:
    folder = config.node.storage
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free_mb = shutil.disk_usage(folder).free // 2**20
    if free_mb < config.node.min_free_spool_mb:
        return (
            f"spool: {free_mb} MB free on the disk of {config.node.storage}, below "
            f"node.min_free_spool_mb = {config.node.min_free_spool_mb}"
        )
    return None


def _parse(moment: str | None) -> datetime | None:
    return datetime.fromisoformat(moment.removesuffix("Z")) if moment else None


def _short(error: SQLAlchemyError) -> str:
    return f"{type(error).__name__}: {str(error.orig if hasattr(error, 'orig') else error)[:120]}"
