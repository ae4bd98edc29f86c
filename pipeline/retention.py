"""The clean stage: remove spool files of series whose work is finished, after a while.

A series' files (received and synthetic) are removed once its retention period has passed
since its last instance and nothing about it can still be needed: it was ignored, or every
job is done or superseded and every delivery of its done jobs was sent or superseded.
Anything failed or still pending keeps its files, so an admin can replay it. Rows stay as
history; ``purged_at`` says when the files went.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, update
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
    """Remove the files of every finished series older than the retention; return how many
    series lost their files.

    The candidates are read first and their files deleted outside any transaction: a
    C-STORE's commit waits for the database's write lock, and must not wait for deletions.
    Only the files the database lists are deleted, so an instance arriving meanwhile keeps
    its file; only series whose every file went get ``purged_at``, the others are tried
    again at the next clean.
    """
    if settings.keep_days == 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=settings.keep_days)
    spool = Spool(storage)
    with sessions() as session:
        candidates = session.scalars(
            select(Series).where(
                Series.purged_at.is_(None),
                Series.last_arrival < cutoff,
                Series.state != SeriesState.RECEIVING,
            )
        ).all()
        finished = [_files_of(series, spool) for series in candidates if _finished(series)]
    removed = [files for files in finished if _remove(files)]
    if removed:
        with sessions.begin() as session:
            session.execute(
                update(Series)
                .where(Series.id.in_([files.series_id for files in removed]))
                .values(purged_at=utcnow())
            )
    for files in removed:
        log.info("series %s: files removed after %g days", files.series_uid, settings.keep_days)
    return len(removed)


@dataclass(frozen=True)
class _SeriesFiles:
    """What the clean stage removes of one series."""

    series_id: int
    series_uid: str
    instances: list[Path]  # the received files the database lists
    folder: Path  # their folder, removed once empty
    outputs: list[Path]  # its jobs' output folders, whole


def _files_of(series: Series, spool: Spool) -> _SeriesFiles:
    return _SeriesFiles(
        series.id,
        series.series_uid,
        [spool.path(instance.path) for instance in series.instances],
        spool.series_folder(series.study_uid, series.series_uid),
        [spool.path(job.output_path) for job in series.jobs if job.output_path],
    )


def _remove(files: _SeriesFiles) -> bool:
    """Delete a series' files; False, with the reason logged, when one cannot be."""
    try:
        for path in files.instances:
            path.unlink(missing_ok=True)
        for folder in files.outputs:
            if folder.exists():
                shutil.rmtree(folder)
    except OSError as error:
        log.warning(
            "series %s: files not removed, tried again at the next clean: %s",
            files.series_uid,
            error,
        )
        return False
    # Gone already, or holding a file the database does not list (one arriving now), which
    # keeps it.
    with contextlib.suppress(OSError):
        files.folder.rmdir()
    return True


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
