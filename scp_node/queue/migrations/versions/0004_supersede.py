"""SEG versions and rejection notes: SEG series and InstanceNumber on jobs; what each
delivery sends (kind, file, SOP Instance UID) and what it waits for.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# Deliveries written before this revision sent their job's SEG.
_BACKFILL = """
UPDATE deliveries SET
    path = (SELECT jobs.seg_path FROM jobs WHERE jobs.id = deliveries.job_id),
    sop_instance_uid = (
        SELECT jobs.seg_sop_instance_uid FROM jobs WHERE jobs.id = deliveries.job_id
    )
"""


def upgrade() -> None:
    """Add the columns; existing deliveries become SEG deliveries of their job's file."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("seg_series_instance_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("seg_instance_number", sa.Integer(), nullable=True))
        batch.create_index("ix_jobs_seg_series_instance_uid", ["seg_series_instance_uid"])
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="seg"))
        batch.add_column(sa.Column("path", sa.Text(), nullable=True))
        batch.add_column(sa.Column("sop_instance_uid", sa.String(64), nullable=True))
        batch.add_column(sa.Column("depends_on_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_deliveries_depends_on_id_deliveries", "deliveries", ["depends_on_id"], ["id"]
        )
    op.execute(_BACKFILL)
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("kind", server_default=None, existing_type=sa.String(16))
        batch.alter_column("path", nullable=False, existing_type=sa.Text())
        batch.alter_column("sop_instance_uid", nullable=False, existing_type=sa.String(64))


def downgrade() -> None:
    """Drop the columns (batch mode: SQLite rebuilds the tables)."""
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("fk_deliveries_depends_on_id_deliveries", type_="foreignkey")
        batch.drop_column("depends_on_id")
        batch.drop_column("sop_instance_uid")
        batch.drop_column("path")
        batch.drop_column("kind")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_seg_series_instance_uid")
        batch.drop_column("seg_instance_number")
        batch.drop_column("seg_series_instance_uid")
