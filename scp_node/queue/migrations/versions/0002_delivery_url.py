"""Deliveries remember the DICOMweb URL of their destination.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``deliveries.url`` (NULL for C-STORE destinations, so existing rows stay valid)."""
    op.add_column("deliveries", sa.Column("url", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop ``deliveries.url`` (batch mode: SQLite rebuilds the table)."""
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("url")
