"""Job events store their level (info, warning, error) instead of having it guessed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

# Rows written before this revision get the level the CLI and the dashboard guessed for them
# from their state, stage and message, so old events keep the colour they were shown with.
_BACKFILL = """
UPDATE job_events SET level = CASE
    WHEN state = 'failed'
        OR lower(message) LIKE '%gave up%'
        OR lower(message) LIKE '%giving up%' THEN 'error'
    WHEN lower(message) LIKE '%fail%'
        OR lower(message) LIKE '%refused%'
        OR lower(message) LIKE '%lost%'
        OR stage = 'cancel' THEN 'warning'
    ELSE 'info'
END
"""


def upgrade() -> None:
    """Add ``job_events.level`` (NOT NULL) and fill it for existing rows."""
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("level", sa.String(16), nullable=False, server_default="info"))
    op.execute(_BACKFILL)
    with op.batch_alter_table("job_events") as batch:
        batch.alter_column("level", server_default=None, existing_type=sa.String(16))


def downgrade() -> None:
    """Drop ``job_events.level`` (batch mode: SQLite rebuilds the table)."""
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("level")
