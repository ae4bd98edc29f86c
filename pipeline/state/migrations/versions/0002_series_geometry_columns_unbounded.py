"""Series geometry columns unbounded: a malformed value as received can be any length,
and PostgreSQL refused one longer than its column (SQLite never checked), answering the
sender "out of resources" where SQLite stored it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# column: its length before
BOUNDED = {"orientation": 128, "pixel_spacing": 64, "frame_of_reference_uid": 64}


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        for column, length in BOUNDED.items():
            batch.alter_column(column, type_=sa.String(), existing_type=sa.String(length))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        for column, length in BOUNDED.items():
            batch.alter_column(column, type_=sa.String(length), existing_type=sa.String())
