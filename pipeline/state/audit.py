"""The audit trail: what was received from whom, synthesized with which model, sent where
and with what result, and what admins did, each with its time and origin.

Rows are written in the same transaction as the change they record, so the trail and the
state never disagree, and they are never changed afterwards, except that a receipt's
counts are filled in when its association ends.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.state.db import Audit, AuditEvent, Delivery, Job, Series, iso, utcnow


def cli_origin() -> str:
    """Who runs a command line: the user and the host, as an admin would name them."""
    return f"cli {getpass.getuser()}@{socket.gethostname()}"


def record(
    session: Session,
    event: AuditEvent,
    origin: str,
    detail: str,
    *,
    series: Series | None = None,
    job: Job | None = None,
    delivery: Delivery | None = None,
    model: str | None = None,
    model_version: str | None = None,
) -> Audit:
    """Add one row in the caller's transaction; the study, series and accession come from
    ``series`` (or the job's or the delivery's series)."""
    job = job or (delivery.job if delivery is not None else None)
    series = series or (job.series if job is not None else None)
    row = Audit(
        at=utcnow(),
        event=event,
        origin=origin,
        study_uid=series.study_uid if series else None,
        series_uid=series.series_uid if series else None,
        accession_number=series.accession_number if series else None,
        job_id=job.id if job else None,
        delivery_id=delivery.id if delivery else None,
        destination=delivery.destination if delivery else None,
        model=model or (job.model if job else None),
        model_version=model_version or (job.model_version if job else None),
        detail=detail,
    )
    session.add(row)
    return row


def record_activation(sessions: sessionmaker, name: str, version: str, origin: str) -> None:
    """A model version made active (by an admin, a training or the daily refresh)."""
    with sessions.begin() as session:
        record(
            session,
            AuditEvent.MODEL_ACTIVATED,
            origin,
            f"{name} {version} is now active",
            model=name,
            model_version=version,
        )


@dataclass(frozen=True)
class AuditFilter:
    """Which rows `dicomnode audit` and the console show; empty fields match everything."""

    accession: str | None = None
    study: str | None = None
    destination: str | None = None
    accession_or_study: str | None = None  # the console's one search box


def read_audit(
    sessions: sessionmaker,
    where: AuditFilter,
    limit: int = 1000,
    newest_first: bool = False,
    skip: int = 0,
) -> list[dict[str, Any]]:
    """The last ``limit`` matching rows (before the newest ``skip``) as plain data, in time
    order (or newest first)."""
    query = select(Audit)
    if where.accession:
        query = query.where(Audit.accession_number == where.accession)
    if where.study:
        query = query.where(Audit.study_uid == where.study)
    if where.destination:
        query = query.where(Audit.destination == where.destination)
    if where.accession_or_study:
        text = where.accession_or_study.strip()
        query = query.where(or_(Audit.accession_number == text, Audit.study_uid == text))
    with sessions() as session:
        rows = session.scalars(query.order_by(Audit.id.desc()).offset(skip).limit(limit)).all()
    return [_as_dict(row) for row in (rows if newest_first else reversed(rows))]


def _as_dict(row: Audit) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": iso(row.at),
        "event": row.event,
        "origin": row.origin,
        "study_uid": row.study_uid,
        "series_uid": row.series_uid,
        "accession_number": row.accession_number,
        "job_id": row.job_id,
        "delivery_id": row.delivery_id,
        "destination": row.destination,
        "model": row.model,
        "model_version": row.model_version,
        "detail": row.detail,
    }
