"""Engine set-up and Alembic migrations on real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from scp_node.errors import ConfigError
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import Base

TABLES = {"studies", "series", "instances", "jobs", "job_events", "deliveries"}


def test_make_engine_creates_parent_dir_and_sets_pragmas(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "dir" / "node.db"
    engine = make_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert db.parent.is_dir()
    finally:
        engine.dispose()


def test_intake_engine_commits_without_waiting_for_the_disk(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}", synchronous="NORMAL")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def test_make_engine_rejects_garbage_url() -> None:
    with pytest.raises(ConfigError, match=r"database\.url"):
        make_engine("not a url at all")


def test_upgrade_creates_tables_on_fresh_file_and_is_idempotent(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        upgrade(engine)
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [
                ("0006",)
            ]
    finally:
        engine.dispose()


def test_migration_matches_models(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cmp.db'}")
    try:
        upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_write_transactions_begin_immediate(tmp_path: Path) -> None:
    db = tmp_path / "imm.db"
    engine = make_engine(f"sqlite:///{db}")
    try:
        upgrade(engine)
        with engine.begin() as conn:
            # The write lock is held from BEGIN on, before any write: another writer that
            # does not wait finds the database locked.
            conn.execute(text("SELECT 1"))
            probe = sqlite3.connect(db, timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    probe.execute("BEGIN IMMEDIATE")
            finally:
                probe.close()
    finally:
        engine.dispose()
