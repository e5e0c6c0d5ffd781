"""PostgreSQL-specific behaviour of the job table, on a real server: the claim skips rows
other transactions hold (``FOR UPDATE SKIP LOCKED``, never waits), and several settle sweepers
running at once make exactly one job per study. The whole job-table contract runs on both
backends in ``tests/unit/test_queue_*.py``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, text

from scp_node.queue import (
    ClaimedJob,
    InstanceRecord,
    Intake,
    RetryPolicy,
    Settling,
    WorkQueue,
    make_engine,
    upgrade,
)

POLICY = RetryPolicy(
    max_attempts=3, initial_backoff_s=1, max_backoff_s=10, multiplier=2, give_up_after_s=3600
)
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    eng = make_engine(postgres_url)
    upgrade(eng)
    yield eng
    eng.dispose()


def _record(intake: Intake, study: str, n: int = 2) -> None:
    for i in range(n):
        intake.record_instance(
            InstanceRecord(
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                sop_instance_uid=f"{study}.1.{i}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                modality="CT",
                path=f"/spool/{study}.{i}.dcm",
                size_bytes=1,
                calling_ae="MODALITY",
            )
        )


def test_engine_is_postgresql_and_migrated(engine: Engine) -> None:
    assert engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        tables = set(
            conn.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
        )
    assert {"studies", "series", "instances", "jobs", "job_events", "deliveries"} <= tables
    assert "alembic_version" in tables


def test_claim_skips_a_job_locked_by_another_transaction(engine: Engine) -> None:
    intake = Intake(engine, clock=lambda: NOW)
    for study in ("1.2.3.1", "1.2.3.2"):
        _record(intake, study)
    later = Settling(engine, POLICY, clock=lambda: NOW + timedelta(seconds=60))
    first, second = later.settle(10, ["m"])
    result: list[object] = []
    with engine.connect() as holder:
        # Another worker's claim transaction, still open, holding the oldest job's row.
        holder.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": first})
        claimer = threading.Thread(
            target=lambda: result.append(
                WorkQueue(engine, POLICY, clock=lambda: NOW + timedelta(seconds=61)).claim("w2", 60)
            ),
            daemon=True,
        )
        claimer.start()
        # Without SKIP LOCKED the claim would wait for the holder: it must not.
        claimer.join(timeout=10)
        blocked = claimer.is_alive()
        holder.rollback()
    claimer.join(timeout=10)
    assert not blocked, "claim waited for a row lock held by another transaction"
    (claimed,) = result
    assert isinstance(claimed, ClaimedJob)
    assert claimed.id == second


def test_concurrent_settle_sweepers_make_one_job_per_study(engine: Engine) -> None:
    intake = Intake(engine, clock=lambda: NOW)
    studies = [f"1.2.4.{i}" for i in range(20)]
    for study in studies:
        _record(intake, study, n=1)
    created: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(4)
    url = engine.url.render_as_string(hide_password=False)

    def sweeper() -> None:
        own = make_engine(url)
        try:
            sweep = Settling(own, POLICY, clock=lambda: NOW + timedelta(seconds=60))
            start.wait()
            for _ in range(5):
                ids = sweep.settle(10, ["m"])
                with lock:
                    created.extend(ids)
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=sweeper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(created) == len(set(created)) == len(studies)
    with engine.connect() as conn:
        per_study = conn.execute(
            text("SELECT study_id, count(*) FROM jobs GROUP BY study_id HAVING count(*) > 1")
        ).all()
    assert per_study == []
