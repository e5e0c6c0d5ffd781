"""Settling on both backends: quiet studies become jobs; expired leases are taken back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scp_node.errors import JobLeaseLostError
from scp_node.queue import JobState, Outcome, Stage
from tests.unit.conftest import POLICY, SERIES, STUDY, FakeClock, InstanceFactory, Table, claim


def test_settle_waits_for_quiet_and_creates_one_job_per_model(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    table.intake.record_instance(instance_factory())
    clock.advance(4)
    table.intake.record_instance(instance_factory())
    clock.advance(9)
    assert table.settling.settle(10, ["a", "b"]) == []
    clock.advance(2)
    ids = table.settling.settle(10, ["a", "b"])
    assert len(ids) == 2
    assert table.settling.settle(10, ["a", "b"]) == []  # settled_through covers it
    jobs = {j.model: j for j in table.views.list()}
    assert set(jobs) == {"a", "b"}
    job = jobs["a"]
    assert job.state is JobState.QUEUED
    assert job.study_instance_uid == STUDY
    assert job.study_date == "20250301"
    assert job.durations == {"receive": 4.0, "settle_wait": 11.0}
    assert job.created_at.tzinfo is not None
    (event,) = table.views.events_after(0, job_id=job.id)
    assert event.stage == "settled"
    assert event.duration_s == 11.0


def test_new_instances_while_queued_add_no_job_but_after_run_do(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    table.intake.record_instance(instance_factory())
    clock.advance(11)
    (first,) = table.settling.settle(10, ["m"])
    table.intake.record_instance(instance_factory())
    clock.advance(11)
    assert table.settling.settle(10, ["m"]) == []  # the queued job will see the new instance
    claimed = claim(table)
    assert claimed.id == first
    table.work.complete(
        first,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path=None,
        seg_sop_instance_uid=None,
        outcome=Outcome.NO_FINDINGS,
        destinations=[],
    )
    table.intake.record_instance(instance_factory())
    clock.advance(11)
    (second,) = table.settling.settle(10, ["m"])
    assert second != first


def test_unsettled_studies_give_counts_and_senders(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    table.intake.record_instance(instance_factory())
    table.intake.record_instance(instance_factory(series="1.2.3.9", calling_ae="OTHER"))
    table.intake.record_instance(instance_factory(study="1.2.5", series="1.2.5.1"))
    (first, second) = table.settling.unsettled_studies()
    assert first.study_instance_uid == STUDY
    assert first.instance_count == 2
    assert first.series_counts == {SERIES: 1, "1.2.3.9": 1}
    assert first.calling_aes == {"MODALITY", "OTHER"}
    assert first.last_received_at == clock.now
    assert second.series_counts == {"1.2.5.1": 1}
    clock.advance(11)
    table.settling.settle(10, ["m"])
    assert table.settling.unsettled_studies() == []


def test_expired_lease_is_requeued_and_old_owner_loses_it(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    stale = claim(table, owner="dead", lease_s=30)
    clock.advance(31)
    assert table.settling.requeue_expired() == [job_id]
    view = table.views.get(job_id)
    assert view.state is JobState.QUEUED
    assert view.error is not None and view.error.startswith("lease expired")
    fresh = claim(table, owner="alive")
    assert fresh.attempts == 2
    with pytest.raises(JobLeaseLostError):
        table.work.heartbeat(job_id, stale.token, 30)
    with pytest.raises(JobLeaseLostError):
        table.work.record_stage(job_id, stale.token, Stage.INFERENCE, 1.0)
    table.work.record_stage(job_id, fresh.token, Stage.INFERENCE, 2.5, message="predicted")
    view = table.views.get(job_id)
    assert view.durations["inference"] == 2.5
    assert view.durations["queue_wait"] == 0.0  # first claim only


def test_expired_lease_with_no_attempts_left_fails(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    for _ in range(POLICY.max_attempts):
        claim(table, lease_s=30)
        clock.advance(31)
        table.settling.requeue_expired()
    view = table.views.get(job_id)
    assert view.state is JobState.FAILED
    assert view.error is not None and "lease expired" in view.error
    assert view.finished_at == clock.now
