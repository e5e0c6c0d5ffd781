"""Engine, sessions and migrations of the job table (SQLite or PostgreSQL)."""

from __future__ import annotations

import functools
import logging
import sqlite3
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from scp_node.errors import ConfigError, NodeError

__all__ = [
    "MIGRATIONS_DIR",
    "READ_ONLY",
    "alembic_config",
    "make_engine",
    "session_factory",
    "upgrade",
]

logger = logging.getLogger(__name__)

#: The packaged Alembic script folder.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Execution option: a transaction that only reads. On SQLite it starts with a deferred
#: ``BEGIN`` so that dashboards and followers never queue behind writers.
READ_ONLY = "scp_node_read_only"


#: How hard a SQLite commit waits for the disk (``PRAGMA synchronous``; see :func:`make_engine`).
Synchronous = Literal["FULL", "NORMAL"]


def _sqlite_on_connect(
    dbapi_connection: sqlite3.Connection,
    _record: ConnectionPoolEntry,
    *,
    synchronous: Synchronous = "FULL",
) -> None:
    # pysqlite's own implicit BEGIN is disabled so that the "begin" event decides how a
    # transaction starts (the documented SQLAlchemy recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Writers take the write lock up front, so concurrent claims from several processes
    # serialise instead of failing with SQLITE_BUSY on lock upgrade.
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, synchronous: Synchronous = "FULL") -> Engine:
    """Create the engine of the job table.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``sqlite:///var/scp-node.db`` or
        ``postgresql+psycopg://user@host/db``.
    synchronous : {"FULL", "NORMAL"}
        SQLite only. ``FULL`` (jobs, deliveries: a commit survives a power cut) fsyncs the
        write-ahead log at every commit. ``NORMAL`` (the receive stage's intake) does not:
        a commit survives a crash of the process but a power cut may lose the last ones,
        until a later ``FULL`` commit (any stage's) makes them durable too; the receive
        stage restores such rows from the spool at start-up
        (:func:`scp_node.spool.recover_unrecorded`).

    Returns
    -------
    Engine
        On SQLite: WAL journal, ``busy_timeout=30000``, ``synchronous``, foreign keys on,
        and every write transaction opened with ``BEGIN IMMEDIATE``. The parent directory of
        the database file is created.

    Raises
    ------
    ConfigError
        If the URL cannot be parsed or its driver is not installed.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database.url: cannot parse {url!r}: {exc}") from exc
    kwargs: dict[str, Any] = {}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Several threads (SCP handlers, worker, dispatcher) share the pool.
        kwargs["connect_args"] = {"check_same_thread": False}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"database.url: cannot use {parsed.drivername!r}: {exc}") from exc
    if is_sqlite:
        event.listen(
            engine, "connect", functools.partial(_sqlite_on_connect, synchronous=synchronous)
        )
        event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Return a session factory bound to ``engine``.

    Parameters
    ----------
    engine : Engine
        From :func:`make_engine`.

    Returns
    -------
    sessionmaker[Session]
        Sessions that keep attribute values after commit (``expire_on_commit=False``).
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config() -> Config:
    """Return an Alembic configuration pointing at the packaged migrations (no ini file).

    Returns
    -------
    Config
        With ``script_location`` set; pass the connection in ``attributes["connection"]``.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the Alembic migrations up to ``revision`` (idempotent).

    Parameters
    ----------
    engine : Engine
        From :func:`make_engine`.
    revision : str
        Target revision; ``"head"`` by default.

    Raises
    ------
    NodeError
        If the database cannot be reached or a migration fails.
    """
    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise NodeError(f"database migration to {revision} failed: {exc}") from exc
    logger.info("database upgraded", extra={"stage": "migrate", "state": revision})
