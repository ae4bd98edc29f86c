"""The job queue: a job is one synthesis of one series generation, with its state.

States: queued -> running -> done | failed, or superseded when the series re-opened
before the job ran. Only the functions here change a job's state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from pipeline.dicom.contrast import Direction
from pipeline.state import audit
from pipeline.state.db import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    utcnow,
)
from pipeline.state.deliveries import create_deliveries, retry_delivery
from pipeline.state.leases import claim_oldest, take_back
from pipeline.state.quality import protocol_of, scanner_of

if TYPE_CHECKING:
    from pipeline.routing import Route

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queue:
    """The jobs waiting for a worker: how many, and since when the oldest waits."""

    depth: int
    oldest: datetime | None


def read_queue(session: Session) -> Queue:
    depth, oldest = session.execute(
        select(func.count(), func.min(Job.created_at)).where(Job.state == JobState.QUEUED)
    ).one()
    return Queue(depth, oldest)


@dataclass(frozen=True)
class JobPlan:
    """What a job runs and where its output goes: a route's, or an earlier job's when a
    series is reprocessed."""

    route: str
    direction: str
    model: str
    destinations: list[str]
    hold_uncertainty_above: float | None
    send_uncertainty: bool | None


def create_job(
    session: Session, series: Series, route: Route, *, refused: str | None = None
) -> Job:
    """Queue a job for ``series`` as ``route`` says; the caller commits. A job ``refused``
    (the reason) is recorded failed at once, so status lists it with the others."""
    plan = JobPlan(
        route.name,
        route.direction.value,
        route.model_name,
        list(route.destinations),
        route.hold_uncertainty_above,
        route.send_uncertainty,
    )
    return _queue(session, series, plan, refused=refused)


def _queue(session: Session, series: Series, plan: JobPlan, *, refused: str | None = None) -> Job:
    now = utcnow()
    job = Job(
        series_id=series.id,
        generation=series.generation,
        route=plan.route,
        direction=plan.direction,
        model=plan.model,
        destinations=list(plan.destinations),
        hold_uncertainty_above=plan.hold_uncertainty_above,
        send_uncertainty=plan.send_uncertainty,
        state=JobState.QUEUED if refused is None else JobState.FAILED,
        reason=refused,
        attempts=0,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    if refused is None:
        log.info("job %d: queued for series %s (route %s)", job.id, series.series_uid, plan.route)
    else:
        audit.record(session, AuditEvent.SYNTHESIS_FAILED, "completion check", refused, job=job)
    return job


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job it holds the lease of."""

    id: int
    series_uid: str
    direction: Direction
    model: str
    attempt: int
    instance_paths: list[str]  # relative to the spool root
    scanner: str  # of the source series (pipeline.state.quality.scanner_of)
    protocol: str
    hold_uncertainty_above: float | None  # the route's
    send_uncertainty: bool


def claim_job(
    sessions: sessionmaker, owner: str, lease_seconds: float, now: datetime | None = None
) -> ClaimedJob | None:
    """Take the oldest runnable job: queued and due, or running under an expired lease.

    Exclusive on any database (``leases.claim_oldest``): of several workers, one gets it.
    """
    now = now or utcnow()
    with sessions.begin() as session:
        job = claim_oldest(
            session,
            Job,
            owner=owner,
            lease_seconds=lease_seconds,
            now=now,
            waiting=JobState.QUEUED,
            due_at=Job.not_before,
            held=JobState.RUNNING,
            changes=lambda _: {"attempts": Job.attempts + 1, "started_at": now},
        )
        if job is None:
            return None
        paths = session.scalars(select(Instance.path).where(Instance.series_id == job.series_id))
        log.info(
            "job %d: running (attempt %d) on %s for series %s",
            job.id,
            job.attempts,
            owner,
            job.series.series_uid,
        )
        return ClaimedJob(
            job.id,
            job.series.series_uid,
            Direction(job.direction),
            job.model,
            job.attempts,
            list(paths),
            scanner_of(job.series.header),
            protocol_of(job.series.header),
            job.hold_uncertainty_above,
            bool(job.send_uncertainty),
        )


@dataclass(frozen=True)
class JobOutput:
    """What a job made, and with what: recorded on the job by ``finish_job``."""

    model_version: str
    model_checksum: str
    device: str  # where the network ran: cpu, cuda...
    timings: dict[str, float]  # seconds per stage, and the slice count
    series_uid: str  # of the synthetic series
    path: str  # its folder, relative to the spool root
    count: int  # its instances
    uncertainty: float | None = None  # pipeline.model.uncertainty; None: not computed
    confidence: float | None = None
    held: str | None = None  # why it is held back instead of sent


def finish_job(sessions: sessionmaker, job_id: int, owner: str, output: JobOutput) -> bool:
    """Record a job's output and queue its deliveries; False if the lease was lost meanwhile."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None or job.lease_owner != owner or job.state != JobState.RUNNING:
            log.warning("job %d: result of %s discarded, its lease was lost", job_id, owner)
            return False
        job.model_version = output.model_version
        job.model_checksum = output.model_checksum
        job.device = output.device
        job.timings = output.timings
        job.output_series_uid = output.series_uid
        job.output_path = output.path
        job.output_count = output.count
        job.uncertainty = output.uncertainty
        job.confidence = output.confidence
        job.release_lease()
        job.updated_at = utcnow()
        held = f"; not sent, {output.held}" if output.held is not None else ""
        audit.record(
            session,
            AuditEvent.SYNTHESIZED,
            owner,
            f"series {job.output_series_uid}: {job.output_count} instance(s) on {job.device}, "
            f"model checksum {(job.model_checksum or '')[:12]}{held}",
            job=job,
        )
        if output.held is not None:
            job.state = JobState.HELD
            job.reason = output.held
            log.warning("job %d: held: %s", job.id, output.held)
            return True
        job.state = JobState.DONE
        job.reason = None
        deliveries = create_deliveries(session, job)
        # Older output of the same series still waiting to be sent would overwrite this
        # job's images on the PACS (same UIDs) if it went out later: it is not sent.
        older = select(Job.id).where(Job.series_id == job.series_id, Job.id < job.id)
        session.execute(
            update(Delivery)
            .where(
                Delivery.job_id.in_(older),
                Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]),
            )
            .values(
                state=DeliveryState.SUPERSEDED,
                reason=f"superseded by job {job.id} of the same series",
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        log.info(
            "job %d: done, %d instance(s) of series %s with model %s, %d delivery(ies) queued",
            job.id,
            job.output_count or 0,
            job.output_series_uid,
            job.model_version,
            len(deliveries),
        )
    return True


def fail_job(
    sessions: sessionmaker,
    job_id: int,
    owner: str,
    reason: str,
    *,
    retryable: bool,
    max_attempts: int,
    retry_delay_seconds: float,
) -> str:
    """Record a failed attempt: queued again after a delay while attempts remain, else failed."""
    now = utcnow()
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None or job.lease_owner != owner:
            return job.state if job else "missing"
        job.release_lease()
        job.updated_at = now
        if retryable and job.attempts < max_attempts:
            job.state = JobState.QUEUED
            job.not_before = now + timedelta(seconds=retry_delay_seconds * job.attempts)
            job.reason = f"attempt {job.attempts} failed, will retry: {reason}"
        else:
            job.state = JobState.FAILED
            job.reason = reason if not retryable else f"failed {job.attempts} time(s): {reason}"
            audit.record(session, AuditEvent.SYNTHESIS_FAILED, owner, job.reason, job=job)
        log.warning("job %d: %s: %s", job.id, job.state, job.reason)
        return job.state


def take_back_jobs_of_gone_workers(sessions: sessionmaker, max_attempts: int) -> list[int]:
    """At start: a job running under the lease of a process of this host that is gone
    (killed, crashed) is taken back now instead of when its lease runs out: queued again,
    or failed if that was its last attempt. Returns the ids taken back."""

    def put_back(job: Job, worker: str | None) -> str:
        why = f"its worker {worker} stopped while running attempt {job.attempts}"
        if job.attempts < max_attempts:
            job.state = JobState.QUEUED
            job.not_before = None
            job.reason = f"taken back: {why}"
        else:
            job.state = JobState.FAILED
            job.reason = f"failed {job.attempts} time(s): {why}"
        return f"{why}, a process of this host that is gone"

    return take_back(sessions, Job, JobState.RUNNING, put_back)


def retry_job(sessions: sessionmaker, job_id: int, *, origin: str) -> str:
    """Replay a job for `dicomnode retry`: a failed job runs again; a done job's failed
    deliveries are sent again. Returns what was done; ValueError if nothing can be.
    ``origin`` (who asked) goes into the audit trail."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ValueError(f"there is no job {job_id}")
        if job.state == JobState.FAILED:
            job.state = JobState.QUEUED
            job.attempts = 0
            job.not_before = None
            job.reason = "replayed by an admin"
            job.updated_at = utcnow()
            log.info("job %d: queued again by an admin", job.id)
            message = f"job {job_id} queued again"
            audit.record(session, AuditEvent.ADMIN_ACTION, origin, f"retry: {message}", job=job)
            return message
        if job.state == JobState.HELD:
            job.state = JobState.DONE
            job.reason = f"released by an admin (was held: {job.reason})"
            job.updated_at = utcnow()
            deliveries = create_deliveries(session, job)
            log.info("job %d: released by an admin, %d delivery(ies)", job.id, len(deliveries))
            message = f"job {job_id} released: {len(deliveries)} delivery(ies) queued"
            audit.record(session, AuditEvent.ADMIN_ACTION, origin, f"retry: {message}", job=job)
            return message
        state, series_uid = job.state, job.series.series_uid
        failed = [d.id for d in job.deliveries if d.state == DeliveryState.FAILED]
    if state == JobState.DONE and failed:
        return "; ".join(retry_delivery(sessions, d, origin=origin) for d in failed)
    if state == JobState.DONE:
        raise ValueError(
            f"job {job_id} is done and none of its deliveries failed: nothing to retry (to "
            f"send it again: dicomnode resend {job_id}; to synthesize it again with the "
            f"active model: dicomnode reprocess {series_uid})"
        )
    raise ValueError(f"job {job_id} is {state}: nothing to retry")


def reprocess_series(sessions: sessionmaker, series_uid: str, *, origin: str) -> str:
    """`dicomnode reprocess`: synthesize a series again with the active model, as its last
    job's route said. The new output replaces the old one where the model is the same
    (the same output UIDs); older output not yet sent is not sent (``finish_job``).
    Returns what was done; ValueError with a readable message if nothing can be."""
    with sessions.begin() as session:
        series = session.scalar(select(Series).where(Series.series_uid == series_uid))
        if series is None:
            raise ValueError(f"there is no series {series_uid}")
        if series.purged_at is not None:
            raise ValueError(
                f"series {series_uid}: its files were removed at "
                f"{series.purged_at:%Y-%m-%d %H:%M} UTC ([retention] keep_days)"
            )
        if series.state == SeriesState.RECEIVING:
            raise ValueError(f"series {series_uid} is still receiving: it runs when complete")
        jobs = sorted(series.jobs, key=lambda job: job.id)
        busy = [job for job in jobs if job.state in (JobState.QUEUED, JobState.RUNNING)]
        if busy:
            raise ValueError(f"series {series_uid}: job {busy[-1].id} is {busy[-1].state} already")
        if not jobs:
            raise ValueError(
                f"series {series_uid} was {series.state} ({series.state_reason}): no route "
                "took it, so there is nothing to run again (`dicomnode route` explains)"
            )
        last = jobs[-1]
        plan = JobPlan(
            last.route,
            last.direction,
            last.model,
            last.destinations,
            last.hold_uncertainty_above,
            last.send_uncertainty,
        )
        job = _queue(session, series, plan)
        message = (
            f"series {series_uid}: job {job.id} queued (route {last.route}, model {last.model})"
        )
        audit.record(session, AuditEvent.ADMIN_ACTION, origin, f"reprocess: {message}", job=job)
        return message
