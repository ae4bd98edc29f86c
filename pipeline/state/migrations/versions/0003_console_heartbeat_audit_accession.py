"""The console's tables: heartbeats of the node's processes, the audit trail, and the
series' accession number the admin searches by.

The console's first version made these itself at start, before migrations existed, so a
database it made is recorded as the baseline while already holding some or all of them:
this revision makes only what is missing. The accession number is unbounded (that
version kept 16 characters): as received, a malformed one can be any length, and
PostgreSQL refuses a value longer than its column.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("heartbeat"):
        _create_heartbeat()
    if inspector.has_table("audit"):
        _unbound_accession_number("audit", inspector)
    else:
        _create_audit()
    columns = {column["name"] for column in inspector.get_columns("series")}
    if "accession_number" in columns:
        _unbound_accession_number("series", inspector)
    else:
        with op.batch_alter_table("series") as batch:
            batch.add_column(sa.Column("accession_number", sa.String(), nullable=True))
    indexes = {index["name"] for index in inspector.get_indexes("series")}
    if "ix_series_accession_number" not in indexes:
        op.create_index("ix_series_accession_number", "series", ["accession_number"])


def downgrade() -> None:
    op.drop_index("ix_series_accession_number", table_name="series")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("accession_number")
    op.drop_table("audit")
    op.drop_table("heartbeat")


def _create_heartbeat() -> None:
    op.create_table(
        "heartbeat",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("process_start", sa.String(), nullable=True),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("beat_at", sa.DateTime(), nullable=False),
        sa.Column("current_job_id", sa.Integer(), nullable=True),
        sa.Column("ticked_at", sa.DateTime(), nullable=True),
        sa.Column("console_url", sa.String(), nullable=True),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_heartbeat_process", "heartbeat", ["host", "pid"])


def _create_audit() -> None:
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("origin", sa.String(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=True),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(), nullable=True),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("delivery_id", sa.Integer(), nullable=True),
        sa.Column("destination", sa.String(), nullable=True),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("model_version", sa.String(), nullable=True),
        sa.Column("detail", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("at", "study_uid", "accession_number", "destination"):
        op.create_index(f"ix_audit_{column}", "audit", [column])


def _unbound_accession_number(table: str, inspector: sa.Inspector) -> None:
    """Widen the 16 characters the console's first version kept (its tables are already
    there, made by it)."""
    (column,) = (c for c in inspector.get_columns(table) if c["name"] == "accession_number")
    if getattr(column["type"], "length", None) is None:
        return
    with op.batch_alter_table(table) as batch:
        batch.alter_column("accession_number", type_=sa.String(), existing_type=column["type"])
