"""The quality monitor's state: scores of synthetic series against real ones, rolling per
scanner, protocol and model version, and the pause they put on a protocol.

A rolling score is the mean of the last ``window`` scores of one key since the last
`dicomnode quality resume` of its scanner, protocol and model. Under the floor it pauses
the key: later jobs of that protocol fail with the reason, until an admin resumes it or a
new model version is activated (a new version is a new key, with no scores yet).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.state import audit
from pipeline.state.db import AuditEvent, MonitorResume, QualityScore, QualityState, utcnow

log = logging.getLogger(__name__)


class MonitorSettings(BaseModel):
    """``[monitor]`` in config.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Score every synthesis whose real counterpart the same study brings.
    enabled: bool = True
    # Rolling correlation inside the head under which a protocol's synthesis pauses; 0: never.
    floor: Annotated[float, Field(ge=0, le=1)] = 0.7
    # Scores a rolling score is the mean of (the most recent).
    window: Annotated[int, Field(ge=1, le=1000)] = 10
    # Scores needed before a key can pause: one odd study is no verdict.
    min_scores: Annotated[int, Field(ge=1, le=1000)] = 3
    check_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 10.0


# What a node monitors when config.toml says nothing about [monitor].
DEFAULT_MONITOR = MonitorSettings()


def scanner_of(header: Mapping[str, Any]) -> str:
    """Manufacturer and model, as a series' header names them."""
    parts = [str(header.get(k) or "") for k in ("Manufacturer", "ManufacturerModelName")]
    return " ".join(p for p in parts if p) or "unknown scanner"


def protocol_of(header: Mapping[str, Any]) -> str:
    """SeriesDescription, else ProtocolName."""
    return str(header.get("SeriesDescription") or header.get("ProtocolName") or "unnamed")


@dataclass(frozen=True)
class QualityKey:
    """What a rolling score is kept per."""

    scanner: str
    protocol: str
    model: str
    model_version: str

    def describe(self) -> str:
        return (
            f"protocol {self.protocol!r} on {self.scanner} with model {self.model} "
            f"{self.model_version}"
        )


@dataclass(frozen=True)
class Rolling:
    key: QualityKey
    count: int  # scores in the window
    total: int  # scores ever, this key
    correlation: float
    ssim: float
    psnr: float
    paused: str | None  # the reason, when paused


class MonitorPause(Exception):
    """A job of a paused protocol: not synthesized, its job fails with this reason."""


def _key_filter(key: QualityKey):
    return (
        QualityScore.scanner == key.scanner,
        QualityScore.protocol == key.protocol,
        QualityScore.model == key.model,
        QualityScore.model_version == key.model_version,
    )


def _resumed_at(session: Session, key: QualityKey) -> datetime | None:
    return session.scalar(
        select(func.max(MonitorResume.resumed_at)).where(
            MonitorResume.scanner == key.scanner,
            MonitorResume.protocol == key.protocol,
            MonitorResume.model == key.model,
        )
    )


def rolling(session: Session, key: QualityKey, settings: MonitorSettings) -> Rolling | None:
    """The rolling score of ``key`` (None without any score since the last resume)."""
    query = select(QualityScore).where(*_key_filter(key), QualityScore.state == QualityState.SCORED)
    total = len(session.scalars(query).all())
    resumed = _resumed_at(session, key)
    if resumed is not None:
        query = query.where(QualityScore.scored_at > resumed)
    recent = session.scalars(
        query.order_by(QualityScore.scored_at.desc(), QualityScore.id.desc()).limit(settings.window)
    ).all()
    if not recent:
        return None
    mean = Rolling(
        key,
        len(recent),
        total,
        sum(r.correlation for r in recent) / len(recent),
        sum(r.ssim for r in recent) / len(recent),
        sum(r.psnr for r in recent) / len(recent),
        None,
    )
    if (
        settings.floor > 0
        and mean.count >= settings.min_scores
        and mean.correlation < settings.floor
    ):
        reason = (
            f"quality monitor paused {key.describe()}: rolling correlation "
            f"{mean.correlation:.3f} over its last {mean.count} scored studies is under the "
            f"floor {settings.floor:.3f} ([monitor] floor); resume with dicomnode quality "
            "resume, or activate a better model"
        )
        return Rolling(**{**asdict(mean), "key": key, "paused": reason})
    return mean


def check_not_paused(sessions: sessionmaker, key: QualityKey, settings: MonitorSettings) -> None:
    """Raise MonitorPause when ``key`` is paused."""
    if not settings.enabled:
        return
    with sessions() as session:
        score = rolling(session, key, settings)
    if score is not None and score.paused:
        raise MonitorPause(score.paused)


class NoScores(ValueError):
    """A resume of a scanner, protocol and model that the monitor has never scored."""


def resume(sessions: sessionmaker, scanner: str, protocol: str, model: str, *, origin: str) -> int:
    """Record an admin's resume, in the audit trail too (``origin``: who asked); return how
    many scores it sets aside. Raises NoScores, recording nothing, where there are none."""
    with sessions.begin() as session:
        known = session.scalar(
            select(func.count())
            .select_from(QualityScore)
            .where(
                QualityScore.scanner == scanner,
                QualityScore.protocol == protocol,
                QualityScore.model == model,
            )
        )
        if not known:
            raise NoScores(
                f"no scores for protocol {protocol!r} on {scanner} with model {model} "
                f"(see dicomnode quality)"
            )
        session.add(
            MonitorResume(scanner=scanner, protocol=protocol, model=model, resumed_at=utcnow())
        )
        audit.record(
            session,
            AuditEvent.ADMIN_ACTION,
            origin,
            f"quality resume: protocol {protocol!r} on {scanner} with model {model} "
            f"({known} earlier score(s) no longer pause it)",
            model=model,
        )
        log.info("quality monitor: %r on %s with %s resumed by an admin", protocol, scanner, model)
        return known


def quality_report(
    sessions: sessionmaker, settings: MonitorSettings, worst: int = 10
) -> dict[str, Any]:
    """Rolling scores per key and the worst recent studies, as plain data (no names)."""
    with sessions() as session:
        keys = session.execute(
            select(
                QualityScore.scanner,
                QualityScore.protocol,
                QualityScore.model,
                QualityScore.model_version,
            )
            .where(QualityScore.state == QualityState.SCORED)
            .distinct()
        ).all()
        rows = []
        for values in sorted(keys):
            score = rolling(session, QualityKey(*values), settings)
            if score is None:  # every score predates a resume
                score = Rolling(
                    QualityKey(*values), 0, 0, float("nan"), float("nan"), float("nan"), None
                )
            rows.append(
                {
                    **asdict(score.key),
                    "scores_in_window": score.count,
                    "scores": score.total,
                    "correlation": _round(score.correlation),
                    "ssim": _round(score.ssim),
                    "psnr": _round(score.psnr),
                    "paused": score.paused,
                }
            )
        recent = session.scalars(
            select(QualityScore)
            .where(QualityScore.state == QualityState.SCORED)
            .order_by(QualityScore.scored_at.desc())
            .limit(max(worst * 10, 100))
        ).all()
        lowest = sorted(recent, key=lambda r: r.correlation)[:worst]
        failed = session.scalars(
            select(QualityScore)
            .where(QualityScore.state == QualityState.FAILED)
            .order_by(QualityScore.id.desc())
            .limit(worst)
        ).all()
        return {
            "settings": settings.model_dump(),
            "rolling": rows,
            "worst_recent": [_study(r) for r in lowest],
            "not_scored": [_study(r) for r in failed],
        }


def _study(row: QualityScore) -> dict[str, Any]:
    return {
        "job_id": row.job_id,
        "accession": row.accession,
        "study_uid": row.study_uid,
        "source_series_uid": row.job.series.series_uid,
        "synthetic_series_uid": row.job.output_series_uid,
        "real_series_uid": row.real_series_uid,
        "scanner": row.scanner,
        "protocol": row.protocol,
        "model_version": f"{row.model} {row.model_version}",
        "correlation": _round(row.correlation),
        "ssim": _round(row.ssim),
        "psnr": _round(row.psnr),
        "placed_by": row.placed_by,
        "reason": row.reason,
        "scored_at": row.scored_at.isoformat(timespec="seconds") + "Z" if row.scored_at else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None or value != value else round(value, 4)
