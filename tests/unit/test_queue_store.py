"""JobStore on real SQLite files and a real PostgreSQL server, with an injected clock (no
sleeping, no mocks)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine

from scp_node.errors import JobLeaseLostError, NodeError
from scp_node.queue import (
    ClaimedJob,
    DeliveryState,
    InstanceRecord,
    JobState,
    JobStore,
    RetryPolicy,
    make_engine,
    upgrade,
)
from scp_node.settings import Destination

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = STUDY + ".1"
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PACS = Destination(name="pacs", ae_title="ORTHANC", host="127.0.0.1", port=4242)
ARCHIVE = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=4243)
POLICY = RetryPolicy(
    max_attempts=3, initial_backoff_s=10, max_backoff_s=100, multiplier=2, give_up_after_s=3600
)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same contract on both backends: a SQLite file, and a fresh real PostgreSQL database
    (server from ``tests/support/postgres.py``)."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'var' / 'node.db'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: Engine, clock: FakeClock) -> JobStore:
    return JobStore(engine, POLICY, clock=clock)


InstanceFactory = Callable[..., InstanceRecord]


@pytest.fixture
def instance_factory(tmp_path: Path) -> InstanceFactory:
    counter = iter(range(1, 1_000_000))

    def make(
        study: str = STUDY, series: str = SERIES, sop: str | None = None, **kw: object
    ) -> InstanceRecord:
        sop = sop or f"{series}.{next(counter)}"
        fields: dict[str, object] = {
            "study_instance_uid": study,
            "series_instance_uid": series,
            "sop_instance_uid": sop,
            "sop_class_uid": CT,
            "transfer_syntax_uid": EXPLICIT_LE,
            "modality": "CT",
            "path": str(tmp_path / "spool" / f"{sop}.dcm"),
            "size_bytes": 1000,
            "calling_ae": "MODALITY",
            "series_number": 2,
            "series_description": "Abdomen",
            "study_date": "20250301",
        }
        fields.update(kw)
        return InstanceRecord(**fields)  # type: ignore[arg-type]

    return make


@pytest.fixture
def job_factory(
    store: JobStore, clock: FakeClock, instance_factory: InstanceFactory
) -> Callable[..., int]:
    def make(study: str = STUDY, model: str = "ct-abdomen", n: int = 2) -> int:
        for _ in range(n):
            store.record_instance(instance_factory(study=study, series=study + ".1"))
        clock.advance(11)
        (job_id,) = store.settle(10, [model])
        return job_id

    return make


def _claim(store: JobStore, owner: str = "w1", lease_s: float = 60) -> ClaimedJob:
    claimed = store.claim(owner, lease_s)
    assert claimed is not None
    return claimed


# -- receive and settle ----------------------------------------------------------------------


def test_record_instance_creates_study_series_and_counts(
    store: JobStore, instance_factory: InstanceFactory
) -> None:
    assert store.record_instance(instance_factory(sop="1.2.3.1"))
    assert store.record_instance(instance_factory(sop="1.2.3.2"))
    assert store.record_instance(instance_factory(series="1.2.3.9", sop="1.2.3.3", modality="SR"))
    assert store.has_instance("1.2.3.1")
    assert not store.has_instance("9.9.9")
    info = {s.series_instance_uid: s for s in store.series_info(STUDY)}
    assert info[SERIES].instance_count == 2
    assert info[SERIES].modality == "CT"
    assert info[SERIES].series_description == "Abdomen"
    assert info["1.2.3.9"].instance_count == 1
    assert [p.name for p in store.study_series(STUDY)[SERIES]] == ["1.2.3.1.dcm", "1.2.3.2.dcm"]
    assert len(store.instance_paths(STUDY)) == 3


def test_resent_instance_replaces_row(
    store: JobStore, clock: FakeClock, instance_factory: InstanceFactory, tmp_path: Path
) -> None:
    assert store.record_instance(instance_factory(sop="1.2.3.1"))
    clock.advance(5)
    again = instance_factory(sop="1.2.3.1", path=str(tmp_path / "new.dcm"), size_bytes=2000)
    assert store.record_instance(again) is False
    assert store.study_series(STUDY) == {SERIES: [tmp_path / "new.dcm"]}
    assert store.series_info(STUDY)[0].instance_count == 1
    # The re-send counts as activity: the study is not quiet yet.
    clock.advance(6)
    assert store.settle(10, ["m"]) == []


def test_settle_waits_for_quiet_and_creates_one_job_per_model(
    store: JobStore, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    store.record_instance(instance_factory())
    clock.advance(4)
    store.record_instance(instance_factory())
    clock.advance(9)
    assert store.settle(10, ["a", "b"]) == []
    clock.advance(2)
    ids = store.settle(10, ["a", "b"])
    assert len(ids) == 2
    assert store.settle(10, ["a", "b"]) == []  # settled_through covers it
    jobs = {j.model: j for j in store.list_jobs()}
    assert set(jobs) == {"a", "b"}
    job = jobs["a"]
    assert job.state is JobState.QUEUED
    assert job.study_instance_uid == STUDY
    assert job.study_date == "20250301"
    assert job.durations == {"receive": 4.0, "settle_wait": 11.0}
    assert job.created_at.tzinfo is not None
    (event,) = store.events_after(0, job_id=job.id)
    assert event.stage == "settled"
    assert event.duration_s == 11.0


def test_new_instances_while_queued_add_no_job_but_after_run_do(
    store: JobStore, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    store.record_instance(instance_factory())
    clock.advance(11)
    (first,) = store.settle(10, ["m"])
    store.record_instance(instance_factory())
    clock.advance(11)
    assert store.settle(10, ["m"]) == []  # the queued job will see the new instance
    claimed = _claim(store)
    assert claimed.id == first
    store.complete_inference(
        first,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path=None,
        seg_sop_instance_uid=None,
        outcome="no_findings",
        destinations=[],
    )
    store.record_instance(instance_factory())
    clock.advance(11)
    (second,) = store.settle(10, ["m"])
    assert second != first


def test_concurrent_record_instance_threads(
    db_url: str, engine: Engine, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    records = [instance_factory() for _ in range(40)]
    errors: list[BaseException] = []

    def run(chunk: list[InstanceRecord]) -> None:
        own = make_engine(db_url)
        try:
            s = JobStore(own, POLICY, clock=clock)
            for rec in chunk:
                s.record_instance(rec)
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run, args=(records[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store = JobStore(engine, POLICY, clock=clock)
    (info,) = store.series_info(STUDY)
    assert info.instance_count == 40
    assert len(store.instance_paths(STUDY)) == 40


# -- claim, heartbeat, leases ----------------------------------------------------------------


def test_claim_sets_lease_and_logs_ids_only(
    store: JobStore,
    clock: FakeClock,
    job_factory: Callable[..., int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = job_factory()
    clock.advance(3)
    with caplog.at_level(logging.INFO, logger="scp_node.queue.store"):
        claimed = _claim(store)
    assert (claimed.id, claimed.study_instance_uid, claimed.attempts) == (job_id, STUDY, 1)
    assert store.claim("w2", 60) is None
    view = store.get_job(job_id)
    assert view is not None
    assert view.state is JobState.RUNNING
    assert view.claimed_at == clock.now
    assert view.durations["queue_wait"] == 3.0
    (record,) = [r for r in caplog.records if r.getMessage().startswith("job claimed")]
    assert record.__dict__["job_id"] == job_id
    assert record.__dict__["study_instance_uid"] == STUDY
    assert record.__dict__["state"] == "running"


def test_claim_takes_oldest_due_job(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    first = job_factory(study="1.2.3")
    second = job_factory(study="1.2.4")
    assert _claim(store).id == first
    assert _claim(store).id == second
    assert store.claim("w", 60) is None


def test_heartbeat_extends_lease_so_requeue_skips_it(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_factory()
    claimed = _claim(store, lease_s=30)
    clock.advance(25)
    store.heartbeat(claimed.id, claimed.token, 30)
    clock.advance(25)
    assert store.requeue_expired() == []
    store.heartbeat(claimed.id, claimed.token, 30)
    with pytest.raises(JobLeaseLostError):
        store.heartbeat(claimed.id, "not-the-token", 30)


def test_expired_lease_is_requeued_and_old_owner_loses_it(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    stale = _claim(store, owner="dead", lease_s=30)
    clock.advance(31)
    assert store.requeue_expired() == [job_id]
    view = store.get_job(job_id)
    assert view is not None
    assert view.state is JobState.QUEUED
    assert view.error is not None and view.error.startswith("lease expired")
    fresh = _claim(store, owner="alive")
    assert fresh.attempts == 2
    with pytest.raises(JobLeaseLostError):
        store.heartbeat(job_id, stale.token, 30)
    with pytest.raises(JobLeaseLostError):
        store.record_stage(job_id, stale.token, "predict", 1.0)
    store.record_stage(job_id, fresh.token, "predict", 2.5, message="predicted")
    view = store.get_job(job_id)
    assert view is not None
    assert view.durations["predict"] == 2.5
    assert view.durations["queue_wait"] == 0.0  # first claim only


def test_expired_lease_with_no_attempts_left_fails(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    for _ in range(POLICY.max_attempts):
        _claim(store, lease_s=30)
        clock.advance(31)
        store.requeue_expired()
    view = store.get_job(job_id)
    assert view is not None
    assert view.state is JobState.FAILED
    assert view.error is not None and "lease expired" in view.error
    assert view.finished_at == clock.now


def test_fail_backs_off_then_fails_for_good_with_reason(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = _claim(store)
    assert store.fail(job_id, claimed.token, "CUDA out of memory") is JobState.QUEUED
    clock.advance(9)
    assert store.claim("w", 60) is None  # backoff_s(1) = 10
    clock.advance(1)
    claimed = _claim(store)
    assert claimed.attempts == 2
    assert store.fail(job_id, claimed.token, "again") is JobState.QUEUED
    clock.advance(19)
    assert store.claim("w", 60) is None  # backoff_s(2) = 20
    clock.advance(1)
    claimed = _claim(store)
    assert store.fail(job_id, claimed.token, "bad pixels") is JobState.FAILED
    view = store.get_job(job_id)
    assert view is not None
    assert (view.state, view.error, view.attempts) == (JobState.FAILED, "bad pixels", 3)
    messages = [e.message for e in store.events_after(0, job_id=job_id) if e.stage == "fail"]
    assert "retry in 10s" in messages[0]
    assert "no attempts left" in messages[-1] and "bad pixels" in messages[-1]
    with pytest.raises(JobLeaseLostError):
        store.fail(job_id, claimed.token, "late")


def test_non_retryable_failure_is_final(store: JobStore, job_factory: Callable[..., int]) -> None:
    job_id = job_factory()
    claimed = _claim(store)
    assert store.fail(job_id, claimed.token, "no CT series", retryable=False) is JobState.FAILED


def test_concurrent_claims_never_share_a_job(
    db_url: str, store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
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
            s = JobStore(own, POLICY, clock=clock)
            start.wait()
            while (job := s.claim(name, 60)) is not None:
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


# -- completion and delivery -----------------------------------------------------------------


def _to_delivering(store: JobStore, job_id: int, dests: list[Destination]) -> None:
    claimed = _claim(store)
    state = store.complete_inference(
        job_id,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path="/outbox/seg.dcm",
        seg_sop_instance_uid="1.2.3.4.5",
        outcome="seg",
        destinations=dests,
    )
    assert state is JobState.DELIVERING


def test_complete_without_seg_is_done(store: JobStore, job_factory: Callable[..., int]) -> None:
    job_id = job_factory()
    claimed = _claim(store)
    state = store.complete_inference(
        job_id,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path=None,
        seg_sop_instance_uid=None,
        outcome="no_findings",
        destinations=[PACS],
    )
    assert state is JobState.DONE
    view = store.get_job(job_id)
    assert view is not None
    assert view.deliveries == ()
    assert view.outcome == "no_findings"
    assert "total" in view.durations
    with pytest.raises(JobLeaseLostError):
        store.heartbeat(job_id, claimed.token, 30)


def test_delivery_success_finishes_job_with_durations(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()  # settle_wait 11 s
    clock.advance(4)
    _to_delivering(store, job_id, [PACS, ARCHIVE])
    assert store.claim_delivery("d", 60) is not None
    second = store.claim_delivery("d", 60)
    assert second is not None
    assert store.claim_delivery("d", 60) is None  # both leased
    clock.advance(2)
    store.delivery_succeeded(second.id, second.token)
    view = store.get_job(job_id)
    assert view is not None and view.state is JobState.DELIVERING
    first = next(d for d in view.deliveries if d.state is DeliveryState.PENDING)
    with pytest.raises(JobLeaseLostError):
        store.delivery_succeeded(second.id, second.token)  # already done
    # The first lease lapses; another dispatcher takes it over.
    clock.advance(60)
    store.requeue_expired()
    again = store.claim_delivery("d2", 60)
    assert again is not None and again.destination == first.destination
    assert again.attempts == 2
    assert (again.seg_path, again.study_instance_uid) == ("/outbox/seg.dcm", STUDY)
    store.delivery_succeeded(again.id, again.token)
    view = store.get_job(job_id)
    assert view is not None
    assert view.state is JobState.DONE
    assert view.finished_at == clock.now
    assert view.durations["delivery"] == 62.0
    assert view.durations["total"] == 11 + 4 + 62
    assert all(d.state is DeliveryState.DONE for d in view.deliveries)
    payload = view.to_json()
    assert payload["state"] == "done"
    assert payload["finished_at"] == clock.now.isoformat()
    assert payload["deliveries"][0]["delivered_at"] is not None


def test_delivery_failure_backs_off_without_cap_then_gives_up(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    _to_delivering(store, job_id, [PACS])
    waits = []
    for _ in range(6):
        d = store.claim_delivery("d", 30)
        assert d is not None
        state = store.delivery_failed(d.id, d.token, "association rejected", status=0xA700)
        assert state is DeliveryState.PENDING
        events = store.events_after(0, job_id=job_id)
        waits.append(events[-1].message)
        clock.advance(POLICY.backoff_s(d.attempts) - 1)
        assert store.claim_delivery("d", 30) is None
        clock.advance(1)
    assert "retry in 10s" in waits[0] and "retry in 100s" in waits[-1]
    assert "0xA700" in waits[0]
    clock.advance(POLICY.give_up_after_s)
    d = store.claim_delivery("d", 30)
    assert d is not None
    assert store.delivery_failed(d.id, d.token, "connection refused") is DeliveryState.FAILED
    view = store.get_job(job_id)
    assert view is not None
    assert view.state is JobState.FAILED
    assert view.error == "delivery to pacs gave up after 7 attempts: connection refused"
    (delivery,) = view.deliveries
    assert (delivery.state, delivery.last_error, delivery.last_status) == (
        DeliveryState.FAILED,
        "connection refused",
        None,
    )


# -- admin -----------------------------------------------------------------------------------


def test_retry_failed_delivery_redelivers_without_rerunning(
    store: JobStore, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    _to_delivering(store, job_id, [PACS])
    d = store.claim_delivery("d", 30)
    assert d is not None
    clock.advance(POLICY.give_up_after_s)
    store.delivery_failed(d.id, d.token, "down")
    store.retry_job(job_id)
    view = store.get_job(job_id)
    assert view is not None
    assert view.state is JobState.DELIVERING
    assert view.error is None
    assert view.deliveries[0].state is DeliveryState.PENDING
    assert view.deliveries[0].attempts == 0
    again = store.claim_delivery("d", 30)
    assert again is not None and again.attempts == 1
    store.delivery_succeeded(again.id, again.token)
    view = store.get_job(job_id)
    assert view is not None and view.state is JobState.DONE
    retry_event = next(e for e in store.events_after(0, job_id=job_id) if e.stage == "retry")
    assert "down" in retry_event.message


def test_retry_failed_inference_requeues_with_attempts_reset(
    store: JobStore, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = _claim(store)
    store.fail(job_id, claimed.token, "broken", retryable=False)
    store.retry_job(job_id)
    view = store.get_job(job_id)
    assert view is not None
    assert (view.state, view.attempts, view.error) == (JobState.QUEUED, 0, None)
    assert _claim(store).attempts == 1


def test_retry_refuses_unknown_or_unfinished_jobs(
    store: JobStore, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    with pytest.raises(NodeError, match="queued"):
        store.retry_job(job_id)
    with pytest.raises(NodeError, match="does not exist"):
        store.retry_job(999)


def test_cancel_running_job_drops_the_workers_lease(
    store: JobStore, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = _claim(store)
    store.cancel_job(job_id)
    with pytest.raises(JobLeaseLostError):
        store.heartbeat(job_id, claimed.token, 30)
    view = store.get_job(job_id)
    assert view is not None and view.state is JobState.CANCELLED
    with pytest.raises(NodeError, match="already cancelled"):
        store.cancel_job(job_id)
    with pytest.raises(NodeError, match="does not exist"):
        store.cancel_job(999)


def test_cancel_delivering_job_fails_pending_deliveries(
    store: JobStore, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    _to_delivering(store, job_id, [PACS, ARCHIVE])
    leased = store.claim_delivery("d", 30)
    assert leased is not None
    store.cancel_job(job_id)
    view = store.get_job(job_id)
    assert view is not None
    assert view.state is JobState.CANCELLED
    assert {(d.state, d.last_error) for d in view.deliveries} == {
        (DeliveryState.FAILED, "cancelled")
    }
    assert store.claim_delivery("d", 30) is None
    with pytest.raises(JobLeaseLostError):
        store.delivery_succeeded(leased.id, leased.token)
    # Retrying a cancelled job that has a SEG redelivers it.
    store.retry_job(job_id)
    view = store.get_job(job_id)
    assert view is not None and view.state is JobState.DELIVERING


# -- views -----------------------------------------------------------------------------------


def test_views_list_count_and_follow_events(
    store: JobStore, job_factory: Callable[..., int]
) -> None:
    ids = [job_factory(study=f"1.2.{i}") for i in range(3)]
    claimed = _claim(store)
    assert store.counts_by_state() == {
        "queued": 2,
        "running": 1,
        "delivering": 0,
        "done": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert [j.id for j in store.list_jobs()] == ids[::-1]
    assert [j.id for j in store.list_jobs(limit=1, offset=1)] == [ids[1]]
    assert [j.id for j in store.list_jobs(JobState.RUNNING)] == [claimed.id]
    events = store.events_after(0)
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert events[-1].stage == "claim"
    assert events[-1].at.tzinfo is not None
    assert store.events_after(events[-1].id) == []
    assert store.events_after(events[0].id, limit=1) == [events[1]]
    assert events[0].to_json()["at"].endswith("+00:00")
    assert store.get_job(999) is None


def test_reads_do_not_wait_for_a_writer(
    engine: Engine, store: JobStore, job_factory: Callable[..., int]
) -> None:
    job_factory()
    with engine.begin():  # holds the SQLite write lock (BEGIN IMMEDIATE)
        assert len(store.list_jobs()) == 1
        assert store.counts_by_state()["queued"] == 1


def test_naive_clock_is_rejected(engine: Engine) -> None:
    store = JobStore(engine, POLICY, clock=lambda: datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        store.claim("w", 60)
