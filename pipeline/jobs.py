"""The job queue: a job is one synthesis of one series generation, with its state.

States: queued -> running -> done | failed, or superseded when the series re-opened
before the job ran. Only the functions here change a job's state.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from pipeline.db import Job, JobState, Series, utcnow
from pipeline.routing import Route

log = logging.getLogger(__name__)


def create_job(session: Session, series: Series, route: Route) -> Job:
    """Queue a job for ``series`` as ``route`` says; the caller commits."""
    now = utcnow()
    job = Job(
        series_id=series.id,
        generation=series.generation,
        route=route.name,
        direction=route.direction.value,
        model=route.model_name,
        destinations=list(route.destinations),
        state=JobState.QUEUED,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    log.info("job %d: queued for series %s (route %s)", job.id, series.series_uid, route.name)
    return job
