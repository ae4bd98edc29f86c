"""The node's state: received series and instances, jobs and deliveries.

All state lives here (pixel data lives in the spool). SQLite in WAL mode is the default;
any SQLAlchemy URL works, PostgreSQL when several machines share the work. State changes
go through the functions of `pipeline.intake`, `pipeline.completion`, `pipeline.state.jobs` and
`pipeline.state.deliveries`, never through ad-hoc updates elsewhere.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, Float, ForeignKey, Index, String, create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    """Now, as a naive UTC datetime (SQLite keeps no time zone; everything here is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def iso(moment: datetime | None) -> str | None:
    """A stored (naive UTC) time for people and JSON: ISO 8601 with a Z."""
    return moment.isoformat(timespec="seconds") + "Z" if moment else None


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"  # instances may still come
    ROUTED = "routed"  # complete, and a route made a job of it
    IGNORED = "ignored"  # complete, and no route wanted it (state_reason says why)
    INCOMPLETE = "incomplete"  # short of its announced count after the wait; its job failed


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # the series re-opened before this job ran; a newer job replaces it
    HELD = "held"  # synthesized, but not to be sent unseen (the reason says why); kept


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # a newer job of the same series delivers its output instead


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[str]: JSON}


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None]
    # Geometry every instance must agree with (first instance's values).
    rows: Mapped[int]
    columns: Mapped[int]
    # Unbounded: as received, a malformed value can be any length, and PostgreSQL (unlike
    # SQLite) refuses a longer one than its column's (migration 0002).
    orientation: Mapped[str | None]
    pixel_spacing: Mapped[str | None]
    frame_of_reference_uid: Mapped[str | None]
    # The count the header announces, None when absent or inconsistent across instances.
    expected_count: Mapped[int | None]
    count_consistent: Mapped[bool] = mapped_column(default=True)
    acquisition_number: Mapped[int | None]
    instance_count: Mapped[int] = mapped_column(default=0)
    first_arrival: Mapped[datetime]
    last_arrival: Mapped[datetime]
    # Header fields routing and classification read (no patient-identifying fields).
    header: Mapped[dict[str, Any]]
    contrast: Mapped[str] = mapped_column(String(16))
    contrast_reason: Mapped[str]
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING)
    state_reason: Mapped[str | None]
    # Incremented each time late instances re-open a completed series.
    generation: Mapped[int] = mapped_column(default=1)
    completed_at: Mapped[datetime | None]
    # When the clean stage removed its files (pipeline.retention); the rows stay as history.
    purged_at: Mapped[datetime | None]
    # The admin searches the console and the audit trail by it; it never goes into logs.
    # Unbounded as received: PostgreSQL would refuse a malformed longer one (migration 0003).
    accession_number: Mapped[str | None] = mapped_column(index=True)

    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")

    __table_args__ = (Index("ix_series_state", "state"),)


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    # Relative to the spool root, so the spool can move with its database.
    path: Mapped[str]
    size: Mapped[int]
    instance_number: Mapped[int | None]
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime]

    series: Mapped[Series] = relationship(back_populates="instances")


class Leased:
    """A row a worker (a job) or a sender (a delivery) holds by a lease while it works on
    it. A holder that dies keeps it until the lease runs out, unless a node starting on its
    host finds the process gone (pipeline.state.leases) and takes the row back at once."""

    lease_owner: Mapped[str | None]  # host:pid:thread, for people (leases.worker_identity)
    lease_expires_at: Mapped[datetime | None]
    lease_host: Mapped[str | None]
    lease_pid: Mapped[int | None]
    lease_process_start: Mapped[str | None]  # see pipeline.state.leases.ProcessIdentity

    def release_lease(self) -> None:
        self.lease_owner = self.lease_expires_at = None
        self.lease_host = self.lease_pid = self.lease_process_start = None


class Job(Leased, Base):
    __tablename__ = "job"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int]
    route: Mapped[str]
    direction: Mapped[str] = mapped_column(String(16))
    model: Mapped[str]
    destinations: Mapped[list[str]]
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    reason: Mapped[str | None]
    attempts: Mapped[int] = mapped_column(default=0)
    not_before: Mapped[datetime | None]
    started_at: Mapped[datetime | None]  # when the last attempt was claimed
    # What produced the output: filled by the worker.
    model_version: Mapped[str | None]
    model_checksum: Mapped[str | None]
    device: Mapped[str | None]
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_series_uid: Mapped[str | None] = mapped_column(String(64))
    output_path: Mapped[str | None]
    output_count: Mapped[int | None]
    # The synthesis' Monte-Carlo dropout uncertainty (pipeline.model.uncertainty): its
    # per-series summary and confidence (1 - it, clipped to [0, 1]).
    uncertainty: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float | None] = mapped_column(Float)
    # The route's, when the job was made (pipeline.routing.Route).
    hold_uncertainty_above: Mapped[float | None] = mapped_column(Float)
    send_uncertainty: Mapped[bool | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    series: Mapped[Series] = relationship(back_populates="jobs")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job")

    __table_args__ = (Index("ix_job_state", "state"),)


class Delivery(Leased, Base):
    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    destination: Mapped[str]
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    reason: Mapped[str | None]
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    instances_total: Mapped[int | None]
    instances_sent: Mapped[int] = mapped_column(default=0)
    # Per-instance outcome of the last attempt: SOP Instance UID -> status or error text.
    instance_results: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    job: Mapped[Job] = relationship(back_populates="deliveries")

    __table_args__ = (Index("ix_delivery_state", "state"),)


class QualityState(enum.StrEnum):
    SCORING = "scoring"  # claimed by a monitor tick
    SCORED = "scored"
    FAILED = "failed"  # could not be scored (reason says why); counts for no rolling score


class QualityScore(Base):
    """A synthetic series scored against the real series of its target contrast that the
    same study brought (pipeline.monitor): one per job."""

    __tablename__ = "quality_score"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), unique=True)
    real_series_uid: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64))
    # Unbounded as received, like Series.accession_number.
    accession: Mapped[str | None]
    # What the rolling scores are kept per (pipeline.state.quality.QualityKey).
    scanner: Mapped[str]
    protocol: Mapped[str]
    model: Mapped[str]
    model_version: Mapped[str]
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None]
    # Per series: mean over the scored slices; inside the head, and the paper's PSNR.
    correlation: Mapped[float | None] = mapped_column(Float)
    ssim: Mapped[float | None] = mapped_column(Float)
    psnr: Mapped[float | None] = mapped_column(Float)
    # Per slice: {"slices": [...], "corr_head": [...], "ssim_head": [...], "psnr_slice": [...]}
    per_slice: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    placed_by: Mapped[str | None]  # header geometry, or the rigid registration
    created_at: Mapped[datetime]
    scored_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship()

    __table_args__ = (Index("ix_quality_key", "scanner", "protocol", "model", "model_version"),)


class MonitorResume(Base):
    """An admin's `dicomnode quality resume`: scores before it no longer pause its
    scanner/protocol/model."""

    __tablename__ = "monitor_resume"

    id: Mapped[int] = mapped_column(primary_key=True)
    scanner: Mapped[str]
    protocol: Mapped[str]
    model: Mapped[str]
    resumed_at: Mapped[datetime]


class HarvestedPair(Base):
    """A study that brought a T1 and a T2: a training pair (pipeline.harvest), its files
    kept under the spool's harvest folder until the count or size cap pushes it out."""

    __tablename__ = "harvested_pair"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    t1_series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    t2_series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    patient: Mapped[str] = mapped_column(String(32))  # salted pseudonym, never the PatientID
    files: Mapped[int]
    size: Mapped[int]  # bytes
    harvested_at: Mapped[datetime]
    released_at: Mapped[datetime | None]  # its files removed to stay within the cap


class Role(enum.StrEnum):
    """What a process that beats runs."""

    SERVE = "serve"  # `dicomnode serve`: receives, completes, dispatches (and may synthesize)
    WORKER = "worker"  # `dicomnode worker`: synthesizes only


class Heartbeat(Base):
    """A process of the node that says it is alive (pipeline.state.heartbeats): one row per
    process, named as a lease names its holder, so a lease's holder is found here."""

    __tablename__ = "heartbeat"

    id: Mapped[int] = mapped_column(primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    host: Mapped[str]
    pid: Mapped[int]
    process_start: Mapped[str | None]  # see pipeline.state.leases.ProcessIdentity
    version: Mapped[str]
    # Where it synthesizes (cpu, cuda:0); None for a node that runs no worker.
    device: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime]
    beat_at: Mapped[datetime]
    current_job_id: Mapped[int | None]
    # serve only: the last completion tick that ran through, and where its console listens.
    ticked_at: Mapped[datetime | None]
    console_url: Mapped[str | None]
    stopped_at: Mapped[datetime | None]  # set by a clean stop

    __table_args__ = (Index("ix_heartbeat_process", "host", "pid"),)


class AuditEvent(enum.StrEnum):
    """What the audit trail records (pipeline.state.audit)."""

    RECEIVED = "received"  # a series (or part of it) arrived on one association
    SYNTHESIZED = "synthesized"  # a job made its synthetic series
    SYNTHESIS_FAILED = "synthesis failed"  # a job failed for good
    SENT = "sent"  # a destination acknowledged every instance of a delivery
    SEND_FAILED = "send failed"  # a delivery gave up
    MODEL_ACTIVATED = "model activated"
    ADMIN_ACTION = "admin action"  # retry, resend, reprocess by an admin


class Audit(Base):
    """One line of the audit trail: what happened, when, on whose behalf. Rows are only
    ever added."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    event: Mapped[str] = mapped_column(String(32))
    # Who: the calling AE and its address, a worker or sender, "cli user@host", "http ADDRESS".
    origin: Mapped[str]
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(index=True)  # as the series'
    job_id: Mapped[int | None]
    delivery_id: Mapped[int | None]
    destination: Mapped[str | None] = mapped_column(index=True)
    model: Mapped[str | None]
    model_version: Mapped[str | None]
    detail: Mapped[str]


# PostgreSQL connections each process keeps open: the SCP holds one per association while
# it records an instance (16 by default), the stages one each; more wait for a free one.
POOL_SIZE = 8
POOL_OVERFLOW = 24


def database_url(url: str) -> URL:
    """``url`` with the driver this node uses: psycopg 3 for a bare ``postgresql://``
    (SQLAlchemy's default there is psycopg2, which the ``postgresql`` extra does not
    install)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_database_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite in WAL mode, or a pool of PostgreSQL connections
    checked before use (a database restart must not fail the next C-STORE)."""
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": 60, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    return create_engine(
        parsed,
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        pool_pre_ping=True,
        pool_recycle=3600,
    )


def open_database(url: str) -> sessionmaker:
    """Connect to ``url`` and return a session factory. A new database gets its tables; one
    at another schema revision is refused (pipeline.state.schema)."""
    from pipeline.state.schema import check_schema  # it reads this module's tables

    engine = create_database_engine(url)
    check_schema(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy, not the driver, begin transactions (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a crash of the process at once, and a power loss from
        # the next checkpoint on. A received instance's fsynced file is its durable record:
        # a row lost with the power is rebuilt from the spool at start (recover_unrecorded).
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        # A deferred transaction that reads and then writes can fail with "database is
        # locked" without waiting; taking the write lock up front makes writers queue.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
