"""Series keep what routing judges at settle time: body part, slice thickness, orientation,
frame count.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the routing columns of ``series``; existing series count one frame per instance."""
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("body_part_examined", sa.String(16), nullable=True))
        batch.add_column(sa.Column("slice_thickness_mm", sa.Float(), nullable=True))
        batch.add_column(sa.Column("orientation", sa.String(128), nullable=True))
        batch.add_column(sa.Column("frame_count", sa.Integer(), nullable=False, server_default="0"))
    op.execute("UPDATE series SET frame_count = instance_count")


def downgrade() -> None:
    """Drop the routing columns (batch mode: SQLite rebuilds the table)."""
    with op.batch_alter_table("series") as batch:
        for column in ("frame_count", "orientation", "slice_thickness_mm", "body_part_examined"):
            batch.drop_column(column)
