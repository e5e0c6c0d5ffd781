"""JobViews on both backends: lists, counts, events (with their stored level), series
summaries for a page of jobs, running leases; reads never wait for a writer."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, text

from scp_node.app import build_queue
from scp_node.errors import JobNotFoundError
from scp_node.queue import JobState, Level, Stage, make_engine, upgrade
from tests.unit.conftest import POLICY, FakeClock, InstanceFactory, Table, claim


def test_views_list_count_and_follow_events(table: Table, job_factory: Callable[..., int]) -> None:
    ids = [job_factory(study=f"1.2.{i}") for i in range(3)]
    claimed = claim(table)
    assert table.views.counts() == {
        "queued": 2,
        "running": 1,
        "delivering": 0,
        "done": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert [j.id for j in table.views.list()] == ids[::-1]
    assert [j.id for j in table.views.list(limit=1, offset=1)] == [ids[1]]
    assert [j.id for j in table.views.list(JobState.RUNNING)] == [claimed.id]
    events = table.views.events_after(0)
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert events[-1].stage == "claim"
    assert events[-1].at.tzinfo is not None
    assert table.views.events_after(events[-1].id) == []
    assert table.views.events_after(events[0].id, limit=1) == [events[1]]
    assert events[0].to_json()["at"].endswith("+00:00")
    with pytest.raises(JobNotFoundError):
        table.views.get(999)


def test_reads_do_not_wait_for_a_writer(
    engine: Engine, table: Table, job_factory: Callable[..., int]
) -> None:
    job_factory()
    with engine.begin():  # holds the SQLite write lock (BEGIN IMMEDIATE)
        assert len(table.views.list()) == 1
        assert table.views.counts()["queued"] == 1


def test_event_level_is_stored_and_returned(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = claim(table, lease_s=30)
    clock.advance(31)
    table.settling.requeue_expired()  # warning: the lease expired
    claimed = claim(table)
    table.work.fail(job_id, claimed.token, "bad pixels", retryable=False)  # error
    table.admin.retry(job_id)  # info
    table.admin.cancel(job_id)  # warning: an operator stopped it
    levels = [(e.stage, e.level) for e in table.views.events_after(0, job_id=job_id)]
    assert levels == [
        (Stage.SETTLED, Level.INFO),
        (Stage.CLAIM, Level.INFO),
        (Stage.REQUEUE, Level.WARNING),
        (Stage.CLAIM, Level.INFO),
        (Stage.FAIL, Level.ERROR),
        (Stage.RETRY, Level.INFO),
        (Stage.CANCEL, Level.WARNING),
    ]
    payload = table.views.events_after(0, job_id=job_id)[-1].to_json()
    assert (payload["stage"], payload["level"]) == ("cancel", "warning")


def test_series_info_for_a_page_of_jobs_is_one_query(
    engine: Engine, table: Table, instance_factory: InstanceFactory
) -> None:
    table.intake.record_instance(instance_factory(study="1.2.1", series="1.2.1.1"))
    table.intake.record_instance(instance_factory(study="1.2.1", series="1.2.1.1"))
    table.intake.record_instance(
        instance_factory(study="1.2.1", series="1.2.1.2", modality="SR", series_number=9)
    )
    table.intake.record_instance(instance_factory(study="1.2.2", series="1.2.2.1"))
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", count)
    try:
        info = table.views.series_info(["1.2.1", "1.2.2", "9.9"])
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 1
    assert [(s.series_instance_uid, s.instance_count) for s in info["1.2.1"]] == [
        ("1.2.1.1", 2),
        ("1.2.1.2", 1),
    ]
    assert (info["1.2.1"][1].modality, info["1.2.1"][1].series_number) == ("SR", 9)
    assert [s.series_instance_uid for s in info["1.2.2"]] == ["1.2.2.1"]
    assert info["9.9"] == []
    assert table.views.series_info([]) == {}


def test_running_leases_name_the_owner_and_latest_event(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    job_factory(study="1.2.9")  # queued, so not listed
    clock.advance(5)
    claimed = claim(table, owner="host:42:work")
    clock.advance(7)
    table.work.record_stage(job_id, claimed.token, Stage.SELECT, 0.5)
    (lease,) = table.views.running_leases()
    assert (lease.job_id, lease.owner) == (job_id, "host:42:work")
    assert lease.claimed_at == clock.now - timedelta(seconds=7)
    assert lease.last_event_at == clock.now


def test_migration_backfills_the_level_of_old_events(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    try:
        upgrade(engine, "0002")
        rows = [
            ("settled", "queued", "study settled: 2 instances, job queued for model m"),
            ("fail", "queued", "attempt 1 of 3 failed, retry in 5s: boom"),
            ("deliver", "delivering", "delivery to pacs gave up after 7 attempts: down"),
            ("fail", "failed", "job failed (not retryable, attempt 1 of 3): no CT"),
            ("cancel", "cancelled", "job cancelled (was queued)"),
            ("deliver", "delivering", "delivery to pacs refused"),
        ]
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (id, study_instance_uid, first_received_at, "
                    "last_received_at, instance_count) VALUES (1, '1.2', :t, :t, 2)"
                ),
                {"t": "2025-01-01 00:00:00"},
            )
            conn.execute(
                text(
                    "INSERT INTO jobs (id, study_id, model, state, attempts, max_attempts, "
                    "not_before, created_at, durations) "
                    "VALUES (1, 1, 'm', 'failed', 1, 3, :t, :t, '{}')"
                ),
                {"t": "2025-01-01 00:00:00"},
            )
            for stage, state, message in rows:
                conn.execute(
                    text(
                        "INSERT INTO job_events (job_id, at, stage, state, message, data) "
                        "VALUES (1, :t, :stage, :state, :message, '{}')"
                    ),
                    {
                        "t": "2025-01-01 00:00:00",
                        "stage": stage,
                        "state": state,
                        "message": message,
                    },
                )
        upgrade(engine)
        levels = [e.level for e in build_queue(engine, POLICY, FakeClock()).views.events_after(0)]
        assert levels == [
            Level.INFO,
            Level.WARNING,
            Level.ERROR,
            Level.ERROR,
            Level.WARNING,
            Level.WARNING,
        ]
    finally:
        engine.dispose()
