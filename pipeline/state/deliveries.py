"""Deliveries: sending a done job's synthetic series to each destination of its route.

States: pending -> sending -> sent, or back to pending after a failed attempt (with
exponential backoff) until ``max_attempts``, then failed. A sender holds a delivery by a
lease; a dead sender's lease runs out and another sender takes the delivery over.

``instance_results`` keeps an ``InstanceResult`` per SOP Instance UID across attempts, so a
retry sends only what the destination has not acknowledged.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.state import audit
from pipeline.state.db import AuditEvent, Delivery, DeliveryState, Job, JobState, utcnow
from pipeline.state.leases import claim_oldest, take_back

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceResult:
    """What a destination did with one instance in one attempt: stored it (perhaps with a
    warning status), or not, and why."""

    stored: bool
    # Stored: the destination's warning status, if it answered with one. Not stored: why.
    detail: str | None = None

    @classmethod
    def sent(cls, warning: str | None = None) -> InstanceResult:
        return cls(stored=True, detail=warning)

    @classmethod
    def not_sent(cls, reason: str) -> InstanceResult:
        return cls(stored=False, detail=reason)

    def __str__(self) -> str:
        """For logs and a delivery's reason: "sent", "sent, warning <status>", or why not."""
        if not self.stored:
            return self.detail or "not sent"
        return f"sent, warning {self.detail}" if self.detail else "sent"

    def to_json(self) -> dict[str, Any]:
        return {"stored": self.stored, "detail": self.detail}

    @classmethod
    def from_json(cls, value: Any) -> InstanceResult:
        """A result as ``to_json`` wrote it, or as the text of ``__str__``, which deliveries
        recorded before results had a type hold: a node upgraded with deliveries pending
        must still know what their destinations acknowledged."""
        if isinstance(value, str):
            stored = value == "sent" or value.startswith("sent, warning ")
            if not stored:
                return cls.not_sent(value)
            return cls.sent(value.removeprefix("sent, warning ") if value != "sent" else None)
        return cls(stored=bool(value["stored"]), detail=value.get("detail"))


SENT = InstanceResult.sent()


class DeliverySettings(BaseModel):
    """``[delivery]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: Annotated[int, Field(ge=1, le=100)] = 10
    # Ceiling of the first retry's delay; it doubles with each failed attempt.
    backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 5
    backoff_max_seconds: Annotated[float, Field(gt=0, le=86400)] = 600
    # Connect, association, DIMSE response and network idle timeouts, each.
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30
    lease_seconds: Annotated[float, Field(gt=0, le=86400)] = 300

    @model_validator(mode="after")
    def _consistent(self) -> DeliverySettings:
        if self.backoff_max_seconds < self.backoff_seconds:
            raise ValueError("backoff_max_seconds must be at least backoff_seconds")
        # A live sender must not lose its lease to timeouts alone (connect, associate, and
        # one lost response), or a second sender would send the same series at once.
        if self.lease_seconds < 4 * self.timeout_seconds:
            raise ValueError("lease_seconds must be at least 4 x timeout_seconds")
        return self


@dataclass(frozen=True)
class ClaimedDelivery:
    """What a sender needs to make one attempt at a delivery it holds the lease of."""

    id: int
    job_id: int
    destination: str
    output_path: str | None  # the job's output folder, relative to the spool root
    already_sent: frozenset[str]  # SOP Instance UIDs this destination acknowledged before
    attempt: int  # this attempt's number, from 1


def create_deliveries(
    session: Session, job: Job, destinations: Sequence[str] | None = None
) -> list[Delivery]:
    """One pending delivery per destination of ``job`` (or of ``destinations``); the
    caller commits."""
    now = utcnow()
    deliveries = [
        Delivery(
            job_id=job.id,
            destination=name,
            state=DeliveryState.PENDING,
            attempts=0,
            instances_total=job.output_count,
            instances_sent=0,
            created_at=now,
            updated_at=now,
        )
        # A route naming a destination twice must not send the series twice.
        for name in dict.fromkeys(job.destinations if destinations is None else destinations)
    ]
    session.add_all(deliveries)
    session.flush()
    for delivery in deliveries:
        log.info(
            "delivery %d: pending, series %s of job %d to %s",
            delivery.id,
            job.output_series_uid,
            job.id,
            delivery.destination,
        )
    return deliveries


def claim_delivery(
    sessions: sessionmaker, owner: str, settings: DeliverySettings, now: datetime | None = None
) -> ClaimedDelivery | None:
    """Take the oldest due delivery (pending and due, or sending under an expired lease).

    Exclusive on any database (``leases.claim_oldest``): of several senders, one gets it.
    """
    now = now or utcnow()
    dead_owners: dict[int, str | None] = {}

    def changes(delivery: Delivery) -> dict[str, Any]:
        if delivery.state != DeliveryState.SENDING:
            return {}
        # The dead sender's attempt counts, so a series that kills its sender every time
        # still ends as failed instead of being tried forever.
        dead_owners[delivery.id] = delivery.lease_owner
        return {
            "attempts": delivery.attempts + 1,
            "reason": f"attempt by {delivery.lease_owner} did not finish (its lease expired)",
        }

    with sessions.begin() as session:
        delivery = claim_oldest(
            session,
            Delivery,
            owner=owner,
            lease_seconds=settings.lease_seconds,
            now=now,
            waiting=DeliveryState.PENDING,
            due_at=Delivery.next_attempt_at,
            held=DeliveryState.SENDING,
            changes=changes,
        )
        if delivery is None:
            return None
        dead_owner = dead_owners.get(delivery.id)
        job = delivery.job
        already_sent = frozenset(uid for uid, result in _results(delivery).items() if result.stored)
        log.info(
            "delivery %d: sending series %s of job %d to %s (attempt %d by %s, %d of %s "
            "instances already sent)%s",
            delivery.id,
            job.output_series_uid,
            job.id,
            delivery.destination,
            delivery.attempts + 1,
            owner,
            len(already_sent),
            delivery.instances_total if delivery.instances_total is not None else "?",
            f"; {dead_owner} held it and stopped" if dead_owner else "",
        )
        return ClaimedDelivery(
            id=delivery.id,
            job_id=job.id,
            destination=delivery.destination,
            output_path=job.output_path,
            already_sent=already_sent,
            attempt=delivery.attempts + 1,
        )


def take_back_deliveries_of_gone_senders(
    sessions: sessionmaker, settings: DeliverySettings
) -> list[int]:
    """At start: a delivery being sent under the lease of a process of this host that is
    gone is taken back now instead of when its lease runs out. As when a lease expires,
    the unfinished attempt counts: pending again at once, or failed if it was the last.
    Returns the ids taken back."""

    def put_back(delivery: Delivery, sender: str | None) -> str:
        why = f"attempt by {sender} did not finish (that process is gone)"
        delivery.attempts += 1
        if delivery.attempts < settings.max_attempts:
            delivery.state = DeliveryState.PENDING
            delivery.next_attempt_at = delivery.updated_at
            delivery.reason = why
        else:
            _give_up(delivery, why)
        return why

    return take_back(sessions, Delivery, DeliveryState.SENDING, put_back)


def _give_up(delivery: Delivery, why: str) -> None:
    delivery.state = DeliveryState.FAILED
    delivery.next_attempt_at = None
    delivery.reason = f"gave up after {delivery.attempts} attempts: {why}"


def _results(delivery: Delivery) -> dict[str, InstanceResult]:
    recorded = delivery.instance_results or {}
    return {uid: InstanceResult.from_json(value) for uid, value in recorded.items()}


def backoff_ceiling(attempts: int, settings: DeliverySettings) -> float:
    """Longest wait after ``attempts`` failed attempts; the actual wait is uniform below it.

    Full jitter (a uniform draw between zero and the exponential ceiling) spreads the
    retries of many deliveries that failed together, e.g. when a PACS restarts.
    """
    exponent = min(max(attempts - 1, 0), 32)  # beyond 2**32 every ceiling is capped anyway
    return min(settings.backoff_max_seconds, settings.backoff_seconds * 2**exponent)


def _locked(session: Session, delivery_id: int) -> Delivery:
    """The delivery, locked for this transaction; ValueError when there is none."""
    delivery = session.scalars(
        select(Delivery).where(Delivery.id == delivery_id).with_for_update()
    ).one_or_none()
    if delivery is None:
        raise ValueError(f"there is no delivery {delivery_id}")
    return delivery


def record_attempt(
    sessions: sessionmaker,
    delivery_id: int,
    owner: str,
    results: Mapping[str, InstanceResult],
    error: str | None,
    settings: DeliverySettings,
    now: datetime | None = None,
) -> str:
    """Record one attempt's outcome and return the delivery's new state.

    ``results`` maps SOP Instance UID to what the destination did with it; ``error`` says
    why the attempt as a whole failed, None when it did not. Sent when every instance so
    far is sent and the attempt had no error; else pending again after a backoff while
    attempts remain; else failed. A result from a sender that lost its lease meanwhile is
    ignored: another sender holds the delivery now.
    """
    now = now or utcnow()
    with sessions.begin() as session:
        delivery = _locked(session, delivery_id)
        if delivery.state != DeliveryState.SENDING or delivery.lease_owner != owner:
            log.warning(
                "delivery %d: result of %s ignored, its lease was lost (now %s, held by %s)",
                delivery_id,
                owner,
                delivery.state,
                delivery.lease_owner,
            )
            return delivery.state
        merged = {**_results(delivery), **results}
        sent = sum(result.stored for result in merged.values())
        delivery.instance_results = {uid: result.to_json() for uid, result in merged.items()}
        delivery.instances_sent = sent
        delivery.instances_total = max(len(merged), delivery.instances_total or 0)
        delivery.attempts += 1
        delivery.release_lease()
        delivery.updated_at = now
        uid = delivery.job.output_series_uid
        if error is None and not merged:
            error = "no instances to send"
        elif error is None and sent < delivery.instances_total:
            error = f"{delivery.instances_total - sent} of {delivery.instances_total} not sent"
        if error is None:
            delivery.state = DeliveryState.SENT
            delivery.reason = None
            delivery.next_attempt_at = None
            audit.record(
                session,
                AuditEvent.SENT,
                owner,
                f"series {uid}: {sent} instance(s) stored by {delivery.destination} "
                f"(attempt {delivery.attempts})",
                delivery=delivery,
            )
            log.info(
                "delivery %d: sent, series %s to %s (%d instances, attempt %d)",
                delivery.id,
                uid,
                delivery.destination,
                sent,
                delivery.attempts,
            )
            return delivery.state
        if delivery.attempts < settings.max_attempts:
            delay = random.uniform(0, backoff_ceiling(delivery.attempts, settings))
            delivery.state = DeliveryState.PENDING
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            delivery.reason = error
            log.warning(
                "delivery %d: attempt %d of series %s to %s failed (%d/%d sent), retry in "
                "%.1f s: %s",
                delivery.id,
                delivery.attempts,
                uid,
                delivery.destination,
                sent,
                delivery.instances_total,
                delay,
                error,
            )
        else:
            _give_up(delivery, error)
            audit.record(
                session,
                AuditEvent.SEND_FAILED,
                owner,
                f"series {uid}: {sent}/{delivery.instances_total} sent; {delivery.reason}",
                delivery=delivery,
            )
            log.error(
                "delivery %d: failed, series %s to %s (%d/%d sent): %s",
                delivery.id,
                uid,
                delivery.destination,
                sent,
                delivery.instances_total,
                delivery.reason,
            )
        return delivery.state


def retry_delivery(sessions: sessionmaker, delivery_id: int, *, origin: str) -> str:
    """`dicomnode retry`: send a failed or pending delivery again now, with fresh attempts.

    Returns what was done; ValueError with a readable message if nothing can be. ``origin``
    (who asked) goes into the audit trail.
    """
    with sessions.begin() as session:
        delivery = _locked(session, delivery_id)
        if delivery.state == DeliveryState.SENT:
            raise ValueError(
                f"delivery {delivery_id} to {delivery.destination} was already sent; "
                f"to send it again: dicomnode resend {delivery.job_id}"
            )
        _refuse_if_sending(delivery)
        previous = delivery.state
        _send_again(
            delivery, "retry requested" + (f" after: {delivery.reason}" if delivery.reason else "")
        )
        log.info(
            "delivery %d: pending again by request (was %s), series %s to %s",
            delivery.id,
            previous,
            delivery.job.output_series_uid,
            delivery.destination,
        )
        message = f"delivery {delivery_id} to {delivery.destination} queued again"
        audit.record(
            session, AuditEvent.ADMIN_ACTION, origin, f"retry: {message}", delivery=delivery
        )
        return message


def resend_job(
    sessions: sessionmaker,
    job_id: int,
    destination: str | None,
    defined: Collection[str],
    *,
    origin: str,
) -> str:
    """`dicomnode resend`: send a done job's series again, to every destination of its
    route or to ``destination`` (any of the ``defined`` ones), every instance anew.

    Returns what was done; ValueError with a readable message if nothing can be.
    """
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ValueError(f"there is no job {job_id}")
        if job.state != JobState.DONE:
            raise ValueError(f"job {job_id} is {job.state}: only a done job's series can be sent")
        if job.series.purged_at is not None:
            raise ValueError(
                f"job {job_id}: its files were removed at {job.series.purged_at:%Y-%m-%d %H:%M} "
                "UTC ([retention] keep_days): there is nothing left to send"
            )
        newer = session.scalar(
            select(Job.id).where(
                Job.series_id == job.series_id, Job.id > job.id, Job.state == JobState.DONE
            )
        )
        if newer is not None:
            raise ValueError(
                f"job {job_id} was replaced by job {newer} of the same series: resend {newer}"
            )
        targets = [d for d in job.deliveries if destination in (None, d.destination)]
        if destination is not None and not targets:
            if destination not in defined:
                known = ", ".join(sorted(defined)) or "none defined"
                raise ValueError(f"no destination named {destination!r} (defined: {known})")
            targets = create_deliveries(session, job, [destination])
        for delivery in targets:
            _refuse_if_sending(delivery)
        for delivery in targets:
            _send_again(delivery, "sent again by request")
            delivery.instance_results = None  # every instance goes again
            delivery.instances_sent = 0
        names = ", ".join(d.destination for d in targets)
        message = f"job {job_id}: series {job.output_series_uid} queued to be sent again to {names}"
        audit.record(session, AuditEvent.ADMIN_ACTION, origin, f"resend: {message}", job=job)
        log.info("%s (by %s)", message, origin)
        return message


def _refuse_if_sending(delivery: Delivery) -> None:
    if delivery.state == DeliveryState.SENDING:
        raise ValueError(
            f"delivery {delivery.id} to {delivery.destination} is being sent now by "
            f"{delivery.lease_owner}; retry it if this attempt fails"
        )


def _send_again(delivery: Delivery, reason: str) -> None:
    now = utcnow()
    delivery.state = DeliveryState.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = now
    delivery.reason = reason
    delivery.updated_at = now
