"""JobAdmin on both backends: retry and cancel, refused with specific errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scp_node.errors import JobLeaseLostError, JobNotFoundError, JobStateError
from scp_node.queue import DeliveryState, JobState
from tests.unit.conftest import ARCHIVE, PACS, POLICY, FakeClock, Table, claim
from tests.unit.test_queue_deliveries import to_delivering


def test_retry_failed_delivery_redelivers_without_rerunning(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    to_delivering(table, job_id, [PACS])
    d = table.deliveries.claim("d", 30)
    assert d is not None
    clock.advance(POLICY.give_up_after_s)
    table.deliveries.failed(d.id, d.token, "down")
    table.admin.retry(job_id)
    view = table.views.get(job_id)
    assert view.state is JobState.DELIVERING
    assert view.error is None
    assert view.deliveries[0].state is DeliveryState.PENDING
    assert view.deliveries[0].attempts == 0
    again = table.deliveries.claim("d", 30)
    assert again is not None and again.attempts == 1
    table.deliveries.succeeded(again.id, again.token)
    assert table.views.get(job_id).state is JobState.DONE
    retry_event = next(e for e in table.views.events_after(0, job_id=job_id) if e.stage == "retry")
    assert "down" in retry_event.message


def test_retry_failed_inference_requeues_with_attempts_reset(
    table: Table, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = claim(table)
    table.work.fail(job_id, claimed.token, "broken", retryable=False)
    table.admin.retry(job_id)
    view = table.views.get(job_id)
    assert (view.state, view.attempts, view.error) == (JobState.QUEUED, 0, None)
    assert claim(table).attempts == 1


def test_retry_refuses_unknown_or_unfinished_jobs(
    table: Table, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    with pytest.raises(JobStateError, match="queued"):
        table.admin.retry(job_id)
    with pytest.raises(JobNotFoundError, match="does not exist"):
        table.admin.retry(999)


def test_cancel_running_job_drops_the_workers_lease(
    table: Table, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = claim(table)
    table.admin.cancel(job_id)
    with pytest.raises(JobLeaseLostError):
        table.work.heartbeat(job_id, claimed.token, 30)
    assert table.views.get(job_id).state is JobState.CANCELLED
    with pytest.raises(JobStateError, match="already cancelled"):
        table.admin.cancel(job_id)
    with pytest.raises(JobNotFoundError, match="does not exist"):
        table.admin.cancel(999)


def test_cancel_delivering_job_fails_pending_deliveries(
    table: Table, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    to_delivering(table, job_id, [PACS, ARCHIVE])
    leased = table.deliveries.claim("d", 30)
    assert leased is not None
    table.admin.cancel(job_id)
    view = table.views.get(job_id)
    assert view.state is JobState.CANCELLED
    assert {(d.state, d.last_error) for d in view.deliveries} == {
        (DeliveryState.FAILED, "cancelled")
    }
    assert table.deliveries.claim("d", 30) is None
    with pytest.raises(JobLeaseLostError):
        table.deliveries.succeeded(leased.id, leased.token)
    # Retrying a cancelled job that has a SEG redelivers it.
    table.admin.retry(job_id)
    assert table.views.get(job_id).state is JobState.DELIVERING
