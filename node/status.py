"""What the node received, what it is doing, and what failed: read from the database."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.quality import format_quality
from node.tables import table
from pipeline.state.db import Delivery, Job, Leased, Series, iso
from pipeline.state.heartbeats import Liveness, lease_liveness, read_heartbeats
from pipeline.state.leases import Holder
from pipeline.state.quality import MonitorSettings, quality_report


def collect_status(
    sessions: sessionmaker, limit: int = 200, monitor: MonitorSettings | None = None
) -> dict[str, Any]:
    """The node's processes, then series, jobs and deliveries, newest first, as plain data
    (no patient names); with ``monitor``, the quality monitor's report too."""
    beats = read_heartbeats(sessions)
    quality = quality_report(sessions, monitor) if monitor is not None else None
    with sessions() as session:
        series = session.scalars(
            select(Series).order_by(Series.last_arrival.desc(), Series.id.desc()).limit(limit)
        ).all()
        jobs = session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)).all()
        deliveries = session.scalars(
            select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        ).all()
        return {
            "workers": beats,
            "series": [
                {
                    "series_uid": s.series_uid,
                    "study_uid": s.study_uid,
                    "description": s.description,
                    "series_number": s.series_number,
                    "contrast": s.contrast,
                    "contrast_reason": s.contrast_reason,
                    "state": s.state,
                    "reason": s.state_reason,
                    "instances": s.instance_count,
                    "expected": s.expected_count,
                    "calling_ae": s.calling_ae,
                    "generation": s.generation,
                    "purged_at": iso(s.purged_at),
                    "first_arrival": iso(s.first_arrival),
                    "last_arrival": iso(s.last_arrival),
                }
                for s in series
            ],
            "jobs": [describe_job(j, beats) for j in jobs],
            "deliveries": [describe_delivery(d, beats) for d in deliveries],
        } | ({"quality": quality} if quality is not None else {})


def describe_job(j: Job, beats: list[dict[str, Any]]) -> dict[str, Any]:
    """A job as plain data, with whether its lease's holder still beats."""
    return {
        "id": j.id,
        "series_uid": j.series.series_uid,
        "generation": j.generation,
        "direction": j.direction,
        "route": j.route,
        "model": j.model,
        "model_version": j.model_version,
        "state": j.state,
        "reason": j.reason,
        "attempts": j.attempts,
        "device": j.device,
        "timings": j.timings,
        "started_at": iso(j.started_at),
        "output_series_uid": j.output_series_uid,
        "uncertainty": j.uncertainty,
        "confidence": j.confidence,
        "destinations": j.destinations,
        **_lease(j, beats),
        "created_at": iso(j.created_at),
        "updated_at": iso(j.updated_at),
    }


def describe_delivery(d: Delivery, beats: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": d.id,
        "job_id": d.job_id,
        "destination": d.destination,
        "state": d.state,
        "reason": d.reason,
        "attempts": d.attempts,
        "instances_sent": d.instances_sent,
        "instances_total": d.instances_total,
        "next_attempt_at": iso(d.next_attempt_at),
        "updated_at": iso(d.updated_at),
        **_lease(d, beats),
    }


def format_status(status: dict[str, Any]) -> str:
    """The status as tables an admin reads in a terminal."""
    series_rows = []
    for s in status["series"]:
        count = f"{s['instances']}/{s['expected']}" if s["expected"] else str(s["instances"])
        reason = s["reason"] if s["state"] in ("ignored", "incomplete") else ""
        if s["state"] == "receiving" and s["expected"] and s["instances"] < s["expected"]:
            reason = f"so far {s['instances']} of {s['expected']} announced instances"
        series_rows.append(
            (
                s["series_uid"],
                s["description"] or "",
                s["contrast"],
                s["state"],
                count,
                s["last_arrival"],
                reason or "",
            )
        )
    job_rows = [
        (
            j["id"],
            j["series_uid"],
            j["direction"],
            j["route"],
            j["state"],
            j["model_version"] or "",
            "" if j["uncertainty"] is None else f"{j['uncertainty']:.4f}",
            _why(j),
        )
        for j in status["jobs"]
    ]
    delivery_rows = [
        (
            d["id"],
            d["job_id"],
            d["destination"],
            d["state"],
            f"{d['instances_sent']}/{d['instances_total'] or '?'}",
            d["attempts"],
            _why(d),
        )
        for d in status["deliveries"]
    ]
    worker_rows = [
        (
            w["role"],
            w["host"],
            w["pid"],
            w["device"] or "-",
            w["started_at"],
            w["beat_at"],
            w["current_job_id"] or "",
            w["liveness"],
        )
        for w in status["workers"]
    ]
    quality = [format_quality(status["quality"])] if "quality" in status else []
    return "\n\n".join(
        [
            "PROCESSES (heartbeats of the last day)\n"
            + table(
                ("role", "host", "pid", "device", "started", "last beat", "job", "state"),
                worker_rows,
            ),
            *quality,
            "SERIES (newest first)\n"
            + table(
                ("series UID", "description", "contrast", "state", "inst", "last arrival", "why"),
                series_rows,
            ),
            "JOBS (newest first)\n"
            + table(
                (
                    "id",
                    "series UID",
                    "direction",
                    "route",
                    "state",
                    "model",
                    "uncertainty",
                    "reason",
                ),
                job_rows,
            ),
            "DELIVERIES (newest first)\n"
            + table(
                ("id", "job", "destination", "state", "sent", "tries", "reason"), delivery_rows
            ),
        ]
    )


def _lease(row: Leased, beats: list[dict[str, Any]]) -> dict[str, Any]:
    """Who holds a running job or a delivery being sent, until when, and whether that
    process still beats: alive, silent, stopped, gone (a node starting on its host takes
    the row back at once) or elsewhere (another host that never beat; the lease runs out
    by itself)."""
    if row.lease_owner is None:
        return {"held_by": None, "held_until": None, "holder": None}
    return {
        "held_by": row.lease_owner,
        "held_until": iso(row.lease_expires_at),
        "holder": (lease_liveness(row, beats) or Holder.ELSEWHERE).value,
    }


_DEAD_HOLDER = {
    Liveness.GONE: "that process is gone: the next start on its host takes it back, or",
    Liveness.SILENT: "that process no longer beats:",
    Liveness.STOPPED: "that process stopped:",
}


def _why(entry: dict[str, Any]) -> str:
    """The reason column: for a held row, whose lease holds it first."""
    reason = entry["reason"] or ""
    if not entry["held_by"]:
        return reason
    held = f"held by {entry['held_by']} until {entry['held_until']}"
    dead = _DEAD_HOLDER.get(entry["holder"])
    if dead:
        held += f" ({dead} its lease ends at {entry['held_until']})"
    return f"{held}; {reason}" if reason else held


def format_audit(rows: list[dict[str, Any]]) -> str:
    """The audit trail as a table, oldest first."""
    return "AUDIT TRAIL\n" + table(
        ("time", "event", "origin", "accession", "study UID", "job", "destination", "detail"),
        [
            (
                r["at"],
                r["event"],
                r["origin"],
                r["accession_number"] or "",
                r["study_uid"] or "",
                r["job_id"] or "",
                r["destination"] or "",
                r["detail"],
            )
            for r in rows
        ],
    )
