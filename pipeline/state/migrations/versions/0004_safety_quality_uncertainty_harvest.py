"""The safety features: the quality monitor's scores and an admin's resumes, the harvested
training pairs, and a job's uncertainty and the route's hold threshold it was made with.

The new states (a series `incomplete`, a job `held`) need no change: states are stored as
plain strings (String(16), no native enum on SQLite or PostgreSQL) and both fit.

The safety branch's first version made these itself at start, before migrations existed
(missing tables, and missing nullable columns added in place), so a database it made is
recorded as the baseline while already holding some or all of them: this revision makes
only what is missing. A score's accession number is unbounded (that version kept 16
characters): as received, a malformed one can be any length, and PostgreSQL refuses a
value longer than its column.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JOB_COLUMNS = (
    sa.Column("uncertainty", sa.Float(), nullable=True),
    sa.Column("confidence", sa.Float(), nullable=True),
    sa.Column("hold_uncertainty_above", sa.Float(), nullable=True),
    sa.Column("send_uncertainty", sa.Boolean(), nullable=True),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    present = {column["name"] for column in inspector.get_columns("job")}
    missing = [column for column in JOB_COLUMNS if column.name not in present]
    if missing:
        with op.batch_alter_table("job") as batch:
            for column in missing:
                batch.add_column(column)
    if inspector.has_table("quality_score"):
        _unbound_accession(inspector)
        indexes = {index["name"] for index in inspector.get_indexes("quality_score")}
        if "ix_quality_key" not in indexes:
            _create_quality_key_index()
    else:
        _create_quality_score()
    if not inspector.has_table("monitor_resume"):
        _create_monitor_resume()
    if not inspector.has_table("harvested_pair"):
        _create_harvested_pair()


def downgrade() -> None:
    op.drop_table("harvested_pair")
    op.drop_table("monitor_resume")
    op.drop_index("ix_quality_key", table_name="quality_score")
    op.drop_table("quality_score")
    with op.batch_alter_table("job") as batch:
        for column in reversed(JOB_COLUMNS):
            batch.drop_column(column.name)


def _create_quality_score() -> None:
    op.create_table(
        "quality_score",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("real_series_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("accession", sa.String(), nullable=True),
        sa.Column("scanner", sa.String(), nullable=False),
        sa.Column("protocol", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(), nullable=True),
        sa.Column("correlation", sa.Float(), nullable=True),
        sa.Column("ssim", sa.Float(), nullable=True),
        sa.Column("psnr", sa.Float(), nullable=True),
        sa.Column("per_slice", sa.JSON(), nullable=True),
        sa.Column("placed_by", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("scored_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
    )
    _create_quality_key_index()


def _create_quality_key_index() -> None:
    op.create_index(
        "ix_quality_key", "quality_score", ["scanner", "protocol", "model", "model_version"]
    )


def _create_monitor_resume() -> None:
    op.create_table(
        "monitor_resume",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("scanner", sa.String(), nullable=False),
        sa.Column("protocol", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("resumed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def _create_harvested_pair() -> None:
    op.create_table(
        "harvested_pair",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("t1_series_id", sa.Integer(), nullable=False),
        sa.Column("t2_series_id", sa.Integer(), nullable=False),
        sa.Column("patient", sa.String(length=32), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("harvested_at", sa.DateTime(), nullable=False),
        sa.Column("released_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["t1_series_id"], ["series.id"]),
        sa.ForeignKeyConstraint(["t2_series_id"], ["series.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_uid"),
    )


def _unbound_accession(inspector: sa.Inspector) -> None:
    """Widen the 16 characters the safety branch's first version kept."""
    (column,) = (c for c in inspector.get_columns("quality_score") if c["name"] == "accession")
    if getattr(column["type"], "length", None) is None:
        return
    with op.batch_alter_table("quality_score") as batch:
        batch.alter_column("accession", type_=sa.String(), existing_type=column["type"])
