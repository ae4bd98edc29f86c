"""The clean stage: remove spool files of series whose work is finished, after a while.

A series' files (received and synthetic) are removed once its retention period has passed
since its last instance and nothing about it can still be needed: it was ignored, or every
job is done or superseded and every delivery of its done jobs was sent or superseded.
Anything failed or still pending keeps its files, so an admin can replay it. Rows stay as
history; ``purged_at`` says when the files went.
"""

from __future__ import annotations

import logging
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from pipeline.spool import Spool
from pipeline.state.db import DeliveryState, JobState, Series, SeriesState, utcnow

log = logging.getLogger(__name__)

FINISHED_JOBS = {JobState.DONE, JobState.SUPERSEDED}
FINISHED_DELIVERIES = {DeliveryState.SENT, DeliveryState.SUPERSEDED}


class RetentionSettings(BaseModel):
    """``[retention]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Days after a series' last instance before its finished files are removed; 0 keeps
    # everything (the spool then grows until an admin cleans it).
    keep_days: Annotated[float, Field(ge=0)] = 30.0


def purge_finished(
    sessions: sessionmaker, storage: Path, settings: RetentionSettings, now: datetime | None = None
) -> int:
    """Remove the files of every finished series older than the retention; return how many."""
    if settings.keep_days == 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=settings.keep_days)
    spool = Spool(storage)
    purged = 0
    with sessions.begin() as session:
        candidates = session.scalars(
            select(Series).where(
                Series.purged_at.is_(None),
                Series.last_arrival < cutoff,
                Series.state != SeriesState.RECEIVING,
            )
        ).all()
        for series in candidates:
            if not _finished(series):
                continue
            folders = [spool.series_folder(series.study_uid, series.series_uid)]
            folders += [spool.path(job.output_path) for job in series.jobs if job.output_path]
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            series.purged_at = utcnow()
            purged += 1
            log.info(
                "series %s: files removed after %g days", series.series_uid, settings.keep_days
            )
    return purged


def _finished(series: Series) -> bool:
    if series.state == SeriesState.IGNORED:
        return True
    if not series.jobs or any(job.state not in FINISHED_JOBS for job in series.jobs):
        return False
    return all(
        delivery.state in FINISHED_DELIVERIES
        for job in series.jobs
        if job.state == JobState.DONE
        for delivery in job.deliveries
    )
