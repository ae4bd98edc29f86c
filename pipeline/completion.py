"""Series completion: decide when a receiving series is whole, and route it.

A series is complete when it holds the count its header announced (while every instance
agreed on it), or when no instance has arrived for the quiet time of the route that
would take it (``[completion] quiet_seconds`` unless the route overrides it). The quiet
time counts only while the node listens: nobody can send to a node that is down, so a
restart does not complete series whose senders were cut off by it.

A series that announced a count it did not reach is incomplete: a synthetic series with
gaps must not reach a radiologist as if whole. It waits ``incomplete_wait_seconds`` more
(a sender may resume), then its job fails with "incomplete: N of M announced instances",
unless its route says ``allow_incomplete = true``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.dicom.contrast import Contrast
from pipeline.routing import Route, select_route
from pipeline.state.db import Series, SeriesState, utcnow
from pipeline.state.jobs import create_job

log = logging.getLogger(__name__)


class CompletionSettings(BaseModel):
    """``[completion]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quiet_seconds: Annotated[float, Field(gt=0)] = 10.0
    check_interval_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    # After its quiet time, how long a series short of its announced count waits for the
    # rest before its job fails as incomplete.
    incomplete_wait_seconds: Annotated[float, Field(ge=0)] = 600.0


@dataclass(frozen=True)
class Completed:
    series_uid: str
    state: SeriesState
    reason: str
    job_id: int | None


def complete_due_series(
    sessions: sessionmaker,
    routes: Sequence[Route],
    settings: CompletionSettings,
    now: datetime | None = None,
    listening_since: datetime | None = None,
) -> list[Completed]:
    """Complete and route every receiving series that is due; return what was done."""
    now = now or utcnow()
    with sessions() as session:
        receiving = session.scalars(
            select(Series).where(Series.state == SeriesState.RECEIVING)
        ).all()
        due_ids = [s.id for s in receiving if _is_due(s, routes, settings, now, listening_since)]
    done = []
    for series_id in due_ids:
        # One transaction per series: a late instance for one series cannot hold up others,
        # and the state is re-read under the write lock in case an instance just arrived.
        with sessions.begin() as session:
            series = session.get(Series, series_id)
            if series.state == SeriesState.RECEIVING and _is_due(
                series, routes, settings, now, listening_since
            ):
                done.append(_complete(session, series, routes, now))
    return done


def _is_due(
    series: Series,
    routes: Sequence[Route],
    settings: CompletionSettings,
    now: datetime,
    listening_since: datetime | None,
) -> bool:
    if series.expected_count is not None and series.instance_count >= series.expected_count:
        return True
    decision = select_route(routes, Contrast(series.contrast), series.header, series.calling_ae)
    quiet = settings.quiet_seconds
    if decision.route is not None and decision.route.quiet_seconds is not None:
        quiet = decision.route.quiet_seconds
    if _refused_as_incomplete(series, decision.route):
        quiet += settings.incomplete_wait_seconds
    # Silence from before the node listened is not the sender's.
    silent_since = max(series.last_arrival, listening_since or series.last_arrival)
    return now - silent_since >= timedelta(seconds=quiet)


def missing_instances(series: Series) -> str | None:
    """ "incomplete: N of M announced instances" for a series short of the count its
    header announced, else None."""
    if series.expected_count is None or series.instance_count >= series.expected_count:
        return None
    return f"incomplete: {series.instance_count} of {series.expected_count} announced instances"


def _refused_as_incomplete(series: Series, route: Route | None) -> bool:
    return (
        route is not None and not route.allow_incomplete and missing_instances(series) is not None
    )


def _complete(session: Session, series: Series, routes: Sequence[Route], now) -> Completed:
    series.completed_at = now
    by_count = series.expected_count is not None and series.instance_count >= series.expected_count
    how = "announced count reached" if by_count else "quiet time elapsed"
    decision = select_route(routes, Contrast(series.contrast), series.header, series.calling_ae)
    if decision.route is None:
        series.state = SeriesState.IGNORED
        series.state_reason = decision.reason
        log.info(
            "series %s: complete (%d instances, %s), ignored: %s",
            series.series_uid,
            series.instance_count,
            how,
            decision.reason,
        )
        return Completed(series.series_uid, SeriesState.IGNORED, decision.reason, None)
    if _refused_as_incomplete(series, decision.route):
        reason = (
            f"{missing_instances(series)} (route {decision.route.name!r} does not allow_incomplete)"
        )
        job = create_job(session, series, decision.route, refused=reason)
        series.state = SeriesState.INCOMPLETE
        series.state_reason = f"{reason}; job {job.id} failed"
        log.warning("series %s: %s, job %d failed", series.series_uid, reason, job.id)
        return Completed(series.series_uid, SeriesState.INCOMPLETE, reason, job.id)
    job = create_job(session, series, decision.route)
    series.state = SeriesState.ROUTED
    series.state_reason = f"{decision.reason}; job {job.id}"
    log.info(
        "series %s: complete (%d instances, %s), %s -> job %d (%s, model %s, to %s)",
        series.series_uid,
        series.instance_count,
        how,
        decision.reason,
        job.id,
        job.direction,
        job.model,
        ", ".join(job.destinations),
    )
    return Completed(series.series_uid, SeriesState.ROUTED, decision.reason, job.id)
