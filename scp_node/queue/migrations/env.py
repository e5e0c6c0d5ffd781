"""Alembic environment of the job table.

Run programmatically by :func:`scp_node.queue.db.upgrade`, which passes an open connection in
``config.attributes["connection"]``. From the command line (``alembic -c
scp_node/queue/alembic.ini ...``) the URL comes from ``sqlalchemy.url`` or ``SCP_NODE_DB_URL``.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection

from scp_node.queue.db import make_engine
from scp_node.queue.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit the SQL to stdout instead of running it (``alembic upgrade --sql``)."""
    url = os.environ.get("SCP_NODE_DB_URL") or config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against the connection handed in, or one made from the configured URL."""
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _configure(connection)
        return
    url = os.environ.get("SCP_NODE_DB_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection passed and no sqlalchemy.url / SCP_NODE_DB_URL set")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            _configure(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
