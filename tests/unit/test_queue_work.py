"""WorkQueue on both backends: claim under a lease, heartbeat, stages, complete, fail."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import Engine

from scp_node.errors import JobLeaseLostError
from scp_node.queue import JobState, Outcome, WorkQueue, make_engine
from tests.unit.conftest import (
    PACS,
    POLICY,
    SERIES,
    STUDY,
    FakeClock,
    InstanceFactory,
    Table,
    claim,
)


def test_claim_sets_lease_and_logs_ids_only(
    table: Table,
    clock: FakeClock,
    job_factory: Callable[..., int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = job_factory()
    clock.advance(3)
    with caplog.at_level(logging.INFO, logger="scp_node.queue"):
        claimed = claim(table)
    assert (claimed.id, claimed.study_instance_uid, claimed.attempts) == (job_id, STUDY, 1)
    assert table.work.claim("w2", 60) is None
    view = table.views.get(job_id)
    assert view.state is JobState.RUNNING
    assert view.claimed_at == clock.now
    assert view.durations["queue_wait"] == 3.0
    (record,) = [r for r in caplog.records if r.getMessage().startswith("job claimed")]
    assert record.__dict__["job_id"] == job_id
    assert record.__dict__["study_instance_uid"] == STUDY
    assert record.__dict__["state"] == "running"


def test_claim_takes_oldest_due_job(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    first = job_factory(study="1.2.3")
    second = job_factory(study="1.2.4")
    assert claim(table).id == first
    assert claim(table).id == second
    assert table.work.claim("w", 60) is None


def test_heartbeat_extends_lease_so_requeue_skips_it(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_factory()
    claimed = claim(table, lease_s=30)
    clock.advance(25)
    table.work.heartbeat(claimed.id, claimed.token, 30)
    clock.advance(25)
    assert table.settling.requeue_expired() == []
    table.work.heartbeat(claimed.id, claimed.token, 30)
    with pytest.raises(JobLeaseLostError):
        table.work.heartbeat(claimed.id, "not-the-token", 30)


def test_fail_backs_off_then_fails_for_good_with_reason(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = claim(table)
    assert table.work.fail(job_id, claimed.token, "CUDA out of memory") is JobState.QUEUED
    clock.advance(9)
    assert table.work.claim("w", 60) is None  # backoff_s(1) = 10
    clock.advance(1)
    claimed = claim(table)
    assert claimed.attempts == 2
    assert table.work.fail(job_id, claimed.token, "again") is JobState.QUEUED
    clock.advance(19)
    assert table.work.claim("w", 60) is None  # backoff_s(2) = 20
    clock.advance(1)
    claimed = claim(table)
    assert table.work.fail(job_id, claimed.token, "bad pixels") is JobState.FAILED
    view = table.views.get(job_id)
    assert (view.state, view.error, view.attempts) == (JobState.FAILED, "bad pixels", 3)
    messages = [e.message for e in table.views.events_after(0, job_id=job_id) if e.stage == "fail"]
    assert "retry in 10s" in messages[0]
    assert "no attempts left" in messages[-1] and "bad pixels" in messages[-1]
    with pytest.raises(JobLeaseLostError):
        table.work.fail(job_id, claimed.token, "late")


def test_non_retryable_failure_is_final(table: Table, job_factory: Callable[..., int]) -> None:
    job_id = job_factory()
    claimed = claim(table)
    assert (
        table.work.fail(job_id, claimed.token, "no CT series", retryable=False) is JobState.FAILED
    )


def test_concurrent_claims_never_share_a_job(
    db_url: str, table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    created = {job_factory(study=f"1.2.{i}") for i in range(30)}
    claimed: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker(name: str) -> None:
        # Each thread has its own engine, as separate processes would.
        own = make_engine(db_url)
        try:
            work = WorkQueue(own, POLICY, clock)
            start.wait()
            while (job := work.claim(name, 60)) is not None:
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(claimed) == len(set(claimed))
    assert set(claimed) == created


def test_complete_without_seg_is_done(table: Table, job_factory: Callable[..., int]) -> None:
    job_id = job_factory()
    claimed = claim(table)
    state = table.work.complete(
        job_id,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path=None,
        seg_sop_instance_uid=None,
        outcome=Outcome.NO_FINDINGS,
        destinations=[PACS],
    )
    assert state is JobState.DONE
    view = table.views.get(job_id)
    assert view.deliveries == ()
    assert view.outcome == "no_findings"
    assert "total" in view.durations
    with pytest.raises(JobLeaseLostError):
        table.work.heartbeat(job_id, claimed.token, 30)


def test_naive_clock_is_rejected(engine: Engine) -> None:
    work = WorkQueue(engine, POLICY, clock=lambda: datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        work.claim("w", 60)


def test_incoming_instances_are_those_no_job_covers_yet(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    assert table.work.incoming_instances() == []
    table.intake.record_instance(instance_factory(modality="CT"))
    table.intake.record_instance(instance_factory(series="1.2.9", modality="MR"))
    incoming = table.work.incoming_instances()
    assert [(i.series_instance_uid, i.modality) for i in incoming] == [
        (SERIES, "CT"),
        ("1.2.9", "MR"),
    ]
    assert table.work.incoming_instances(after_id=incoming[0].id) == incoming[1:]
    assert table.work.incoming_instances(limit=1) == incoming[:1]
    clock.advance(60)
    table.settling.settle(10.0, ["m"])
    assert table.work.incoming_instances() == []  # settled: its job reads them
    table.intake.record_instance(instance_factory())  # the study grows again
    assert [i.id for i in table.work.incoming_instances()] == [i.id for i in incoming] + [
        incoming[-1].id + 1
    ]
