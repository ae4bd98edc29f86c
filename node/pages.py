"""What the console's pages show, read from the database and the spool: plain rows, newest
first, a page at a time, filtered by state and searched by accession number or study UID.
Patient names only where the config allows them (read from the first instance's file)."""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from node.status import describe_delivery, describe_job
from pipeline.model.lesionfidelity import describe_lesion_fidelity
from pipeline.model.registry import ModelRegistry
from pipeline.spool import Spool
from pipeline.state.db import Delivery, DeliveryState, Instance, Job, JobState, Series, iso, utcnow
from pipeline.state.heartbeats import read_heartbeats
from pipeline.state.jobs import read_queue

PAGE_SIZE = 50
THUMBNAIL_PIXELS = 160
_FIVE_MIN, _HOUR, _DAY = timedelta(minutes=5), timedelta(hours=1), timedelta(days=1)


@dataclass(frozen=True)
class Query:
    """One list page's request: its page (from 1), a state and a search (accession number
    or study UID, exact)."""

    page: int = 1
    state: str | None = None
    search: str | None = None

    @property
    def offset(self) -> int:
        return (max(self.page, 1) - 1) * PAGE_SIZE


def overview(sessions: sessionmaker, spool_root: Path) -> dict[str, Any]:
    """The overview's figures: queue, rates, failures, disk."""
    now = utcnow()
    with sessions() as session:
        queue = read_queue(session)
        recent = session.scalar(_count(Instance).where(Instance.received_at >= now - _FIVE_MIN))
        done = session.scalar(
            _count(Job).where(Job.state == JobState.DONE, Job.updated_at >= now - _HOUR)
        )
        failed_jobs = session.scalar(
            _count(Job).where(Job.state == JobState.FAILED, Job.updated_at >= now - _DAY)
        )
        failed_deliveries = session.scalar(
            _count(Delivery).where(
                Delivery.state == DeliveryState.FAILED, Delivery.updated_at >= now - _DAY
            )
        )
    disk = shutil.disk_usage(spool_root)
    return {
        "queued": queue.depth,
        "oldest_queued": iso(queue.oldest),
        "instances_per_second": round(recent / _FIVE_MIN.total_seconds(), 2),
        "jobs_per_hour": done,
        "failures_24h": failed_jobs + failed_deliveries,
        "spool_free_gb": round(disk.free / 2**30, 1),
        "spool_free_percent": round(100 * disk.free / disk.total),
    }


def _count(table: type) -> Select:
    return select(func.count()).select_from(table)


def series_page(
    sessions: sessionmaker, query: Query, spool: Spool, names: bool
) -> list[dict[str, Any]]:
    statement = select(Series).order_by(Series.last_arrival.desc(), Series.id.desc())
    if query.state:
        statement = statement.where(Series.state == query.state)
    statement = _searched(statement, query)
    with sessions() as session:
        rows = session.scalars(statement.offset(query.offset).limit(PAGE_SIZE)).all()
        return [
            {
                "series_uid": s.series_uid,
                "study_uid": s.study_uid,
                "accession_number": s.accession_number,
                "patient_name": _patient_name(session, s, spool) if names else None,
                "description": s.description,
                "contrast": s.contrast,
                "state": s.state,
                "reason": s.state_reason,
                "instances": s.instance_count,
                "calling_ae": s.calling_ae,
                "last_arrival": iso(s.last_arrival),
                "jobs": [job.id for job in s.jobs],
            }
            for s in rows
        ]


def jobs_page(sessions: sessionmaker, query: Query) -> list[dict[str, Any]]:
    """Jobs as `dicomnode status` describes them (reason, lease, timings), with their
    series' study and accession."""
    statement = select(Job).join(Series).order_by(Job.id.desc())
    if query.state:
        statement = statement.where(Job.state == query.state)
    statement = _searched(statement, query)
    beats = read_heartbeats(sessions)
    with sessions() as session:
        jobs = session.scalars(statement.offset(query.offset).limit(PAGE_SIZE)).all()
        return [
            describe_job(job, beats)
            | {
                "study_uid": job.series.study_uid,
                "accession_number": job.series.accession_number,
                "description": job.series.description,
            }
            for job in jobs
        ]


def deliveries_page(
    sessions: sessionmaker, query: Query, destination: str | None
) -> list[dict[str, Any]]:
    statement = select(Delivery).join(Job).join(Series).order_by(Delivery.id.desc())
    if query.state:
        statement = statement.where(Delivery.state == query.state)
    if destination:
        statement = statement.where(Delivery.destination == destination)
    statement = _searched(statement, query)
    beats = read_heartbeats(sessions)
    with sessions() as session:
        rows = session.scalars(statement.offset(query.offset).limit(PAGE_SIZE)).all()
        return [describe_delivery(delivery, beats) for delivery in rows]


def destination_summary(sessions: sessionmaker) -> dict[str, dict[str, int]]:
    """Per destination: how many deliveries are in each state."""
    summary: dict[str, dict[str, int]] = {}
    with sessions() as session:
        rows = session.execute(
            select(Delivery.destination, Delivery.state, func.count()).group_by(
                Delivery.destination, Delivery.state
            )
        )
        for destination, state, count in rows:
            summary.setdefault(destination, {})[state] = count
    return summary


def models(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Every registered version with its card, the active one marked."""
    found = []
    active = registry.active_versions()
    for name in registry.names():
        for version in reversed(registry.versions(name)):
            try:
                card = registry.read_card(name, version)
            except Exception as error:  # a damaged file is shown as such, not a 500
                card = {"error": str(error)}
            found.append(
                {
                    "name": name,
                    "version": version,
                    "active": version == active.get(name),
                    "card": card,
                    "lesions": describe_lesion_fidelity(card["metrics"])
                    if "metrics" in card
                    else "",
                }
            )
    return found


def _searched(statement: Select, query: Query) -> Select:
    if not query.search:
        return statement
    text = query.search.strip()
    return statement.where(or_(Series.accession_number == text, Series.study_uid == text))


def _patient_name(session: Session, series: Series, spool: Spool) -> str | None:
    first = session.scalar(select(Instance.path).where(Instance.series_id == series.id).limit(1))
    if first is None or series.purged_at is not None:
        return None
    try:
        return str(dcmread(spool.path(first), stop_before_pixels=True).get("PatientName", ""))
    except Exception:
        return None


def thumbnail(files: list[Path]) -> bytes | None:
    """A PNG of the middle slice of ``files`` (in instance order), windowed to its 1st-99th
    percentile; None where there is no readable slice."""
    if not files:
        return None
    try:
        slices = sorted(
            (dcmread(path, stop_before_pixels=True).get("InstanceNumber") or 0, path)
            for path in files
        )
        pixels = dcmread(slices[len(slices) // 2][1]).pixel_array.astype(np.float32)
    except Exception:  # a slice pydicom cannot decode: the page shows no picture
        return None
    low, high = np.percentile(pixels, [1, 99])
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255
    image = Image.fromarray(scaled.astype(np.uint8))
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def job_files(sessions: sessionmaker, spool: Spool, job_id: int) -> tuple[list[Path], list[Path]]:
    """(source files, synthetic files) of a job, those still in the spool."""
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            return [], []
        sources = session.scalars(select(Instance.path).where(Instance.series_id == job.series_id))
        source = [spool.path(p) for p in sources if spool.path(p).is_file()]
        output = spool.series_files(job.output_path) if job.output_path else []
    return source, output
