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

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Index,
    String,
    create_engine,
    event,
    inspect,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    """Now, as a naive UTC datetime (SQLite keeps no time zone; everything here is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


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
    HELD = "held"  # synthesized, but too uncertain to send (reason says how much); kept


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
    orientation: Mapped[str | None] = mapped_column(String(128))
    pixel_spacing: Mapped[str | None] = mapped_column(String(64))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64))
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
    accession: Mapped[str | None] = mapped_column(String(16))
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


def open_database(url: str) -> sessionmaker:
    """Connect to ``url``, create the tables if needed, and return a session factory."""
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(
        url,
        connect_args={"timeout": 60, "check_same_thread": False} if is_sqlite else {},
        pool_pre_ping=not is_sqlite,
    )
    if is_sqlite:
        _configure_sqlite(engine)
    Base.metadata.create_all(engine)
    _add_new_columns(engine)
    return sessionmaker(engine, expire_on_commit=False)


def _add_new_columns(engine: Engine) -> None:
    """Add the columns a model gained since the database was made (create_all makes only
    missing tables), so a node upgraded in place opens its existing database. Only nullable
    columns are ever added this way; anything else needs a real migration."""
    with engine.begin() as connection:
        inspector = inspect(connection)
        for table in Base.metadata.sorted_tables:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise RuntimeError(f"{table.name}.{column.name} is missing and not nullable")
                kind = column.type.compile(dialect=engine.dialect)
                connection.exec_driver_sql(
                    f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"
                )


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
