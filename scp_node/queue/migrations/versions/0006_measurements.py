"""Jobs keep the per-segment measurements of their SEG (volume, mean, SD) for the admin
views; deliveries may now send SRs and LABELMAP SEGs too (``deliveries.kind`` is a plain
string: no change there).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``jobs.measurements`` (JSON, NULL for jobs made before or without a SEG)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("measurements", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drop ``jobs.measurements`` (batch mode: SQLite rebuilds the table)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("measurements")
