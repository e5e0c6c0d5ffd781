"""The settle stage: the completeness gate's decisions from a PACS's instance counts (the
C-FIND itself is tested against Orthanc in tests/e2e/test_completeness.py), and one sweep of
:class:`Settler` over a real job table."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from scp_node.dicom.scu import Peer
from scp_node.errors import DeliveryError
from scp_node.queue import JobState, Stage, UnsettledStudy
from scp_node.settings import Source
from scp_node.settle import CompletenessGate, Settler
from tests.unit.conftest import STUDY, FakeClock, InstanceFactory, Table, claim

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
PACS = Source(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)


def _study(uid: str, counts: dict[str, int], quiet_s: float, ae: str = "PACS") -> UnsettledStudy:
    return UnsettledStudy(
        study_instance_uid=uid,
        last_received_at=NOW - timedelta(seconds=quiet_s),
        instance_count=sum(counts.values()),
        calling_aes=frozenset({ae}),
        series_counts=counts,
    )


def _gate(answers: dict[str, dict[str, int]], asked: list[str]) -> CompletenessGate:
    def query(peer: Peer, uid: str) -> dict[str, int]:
        asked.append(uid)
        if uid not in answers:
            raise DeliveryError("refused")
        return answers[uid]

    return CompletenessGate(
        [PACS], calling_ae="SCPNODE", quiet_s=10, max_wait_s=60, query_interval_s=5, query=query
    )


def test_complete_study_is_ready_before_its_quiet_period() -> None:
    asked: list[str] = []
    gate = _gate({"1.1": {"1.1.1": 20, "1.1.2": 3}}, asked)
    decision = gate.decide([_study("1.1", {"1.1.1": 20}, quiet_s=0.5)], NOW)
    # Only the series we received count: a series the PACS did not send is not awaited.
    assert decision.ready == {"1.1"} and decision.hold == frozenset()


def test_incomplete_study_is_held_until_max_wait() -> None:
    gate = _gate({"1.2": {"1.2.1": 20}}, [])
    assert gate.decide([_study("1.2", {"1.2.1": 15}, quiet_s=30)], NOW).hold == {"1.2"}
    late = gate.decide([_study("1.2", {"1.2.1": 15}, quiet_s=61)], NOW)
    assert late.hold == frozenset() and late.ready == frozenset()  # quiet rule settles it


def test_unknown_sender_or_failed_query_falls_back_to_the_quiet_rule() -> None:
    asked: list[str] = []
    gate = _gate({}, asked)
    decision = gate.decide(
        [_study("1.3", {"1.3.1": 5}, quiet_s=1), _study("1.4", {"1.4.1": 5}, 1, ae="OTHER")], NOW
    )
    assert decision == decision.__class__(frozenset(), frozenset())
    assert asked == ["1.3"]  # the unknown AE is never queried


def test_answers_are_cached_until_new_instances_arrive() -> None:
    asked: list[str] = []
    gate = _gate({"1.5": {"1.5.1": 20}}, asked)
    gate.decide([_study("1.5", {"1.5.1": 10}, quiet_s=1)], NOW)
    gate.decide([_study("1.5", {"1.5.1": 10}, quiet_s=2)], NOW)
    assert asked == ["1.5"]
    assert gate.decide([_study("1.5", {"1.5.1": 20}, quiet_s=0)], NOW).ready == {"1.5"}
    assert asked == ["1.5", "1.5"]


def test_settler_sweep_settles_complete_study_early_and_requeues_expired_leases(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    for _ in range(3):
        table.intake.record_instance(instance_factory(calling_ae="PACS"))
    table.intake.record_instance(instance_factory(study="1.3", series="1.3.1", calling_ae="PACS"))
    asked: list[str] = []
    # The PACS knows STUDY complete (3 of 3) and study 1.3 incomplete (1 of 4).
    gate = _gate({STUDY: {STUDY + ".1": 3}, "1.3": {"1.3.1": 4}}, asked)
    wake = threading.Event()
    settler = Settler(table.settling, ["m"], quiet_s=10, gate=gate, wake_work=wake, clock=clock)

    clock.advance(1)
    assert settler.run_once() and wake.is_set()
    (job,) = table.views.list()
    assert job.study_instance_uid == STUDY  # before its quiet period, 1.3 held
    wake.clear()
    clock.advance(20)  # 1.3 is quiet now but still held (max_wait_s 60)
    assert not settler.run_once() and not wake.is_set()
    assert len(table.views.list()) == 1

    claim(table, lease_s=5)
    clock.advance(6)
    assert settler.run_once() and wake.is_set()
    assert table.views.get(job.id).state is JobState.QUEUED
    assert [e.stage for e in table.views.events_after(0, job_id=job.id)][-1] is Stage.REQUEUE


def test_settler_waits_quiet_s_after_its_start_before_the_quiet_rule(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    # A study whose last instance came long before the node (re)started: quiet only because
    # nobody was listening. The sender's resend after the restart must find it unsettled.
    table.intake.record_instance(instance_factory())
    clock.advance(3600)
    settler = Settler(table.settling, ["m"], quiet_s=10, clock=clock)
    assert not settler.run_once()
    clock.advance(9)
    assert not settler.run_once()
    assert table.views.list() == []
    clock.advance(1)
    assert settler.run_once()
    (job,) = table.views.list()
    assert job.study_instance_uid == STUDY


def test_each_series_whose_count_has_arrived_is_complete_even_in_an_incomplete_study() -> None:
    gate = _gate({"1.6": {"1.6.1": 3, "1.6.2": 5}}, [])
    decision = gate.decide([_study("1.6", {"1.6.1": 3, "1.6.2": 2}, quiet_s=0)], NOW)
    assert decision.hold == {"1.6"}
    assert decision.complete_series == {"1.6.1"}


def test_a_series_the_pacs_count_says_is_complete_starts_its_per_series_job_at_once(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    first, second = STUDY + ".1", STUDY + ".2"
    for series in (first, second):
        for _ in range(2):
            table.intake.record_instance(instance_factory(series=series, calling_ae="PACS"))
    # The PACS holds 2 instances of the first series (all here) and 4 of the second.
    gate = _gate({STUDY: {first: 2, second: 4}}, [])
    settler = Settler(
        table.settling,
        ["per-series", "whole-study"],
        quiet_s=10,
        gate=gate,
        clock=clock,
        per_series=["per-series"],
        series_quiet_s=600,
    )
    # No quiet wait at all, within the settler's start-up wait: the count says so.
    assert settler.run_once()
    jobs = [(j.model, j.series_instance_uid) for j in table.views.list()]
    assert jobs == [("per-series", first)]
    table.intake.record_instance(instance_factory(series=second, calling_ae="PACS"))
    assert not settler.run_once()  # 3 of 4: the second series and the study wait
    table.intake.record_instance(instance_factory(series=second, calling_ae="PACS"))
    assert settler.run_once()
    jobs = sorted((j.model, j.series_instance_uid or "") for j in table.views.list())
    assert jobs == [("per-series", first), ("per-series", second), ("whole-study", "")]


def test_settler_knows_when_the_next_study_turns_quiet(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    # The sweep runs at that moment rather than at its next poll (up to poll_s late).
    settler = Settler(table.settling, ["m"], quiet_s=10, clock=clock)
    assert settler.next_quiet_in() is None
    table.intake.record_instance(instance_factory())
    # Not before the settler's own quiet start (it started just now, too).
    assert settler.next_quiet_in() == 10
    clock.advance(30)
    table.intake.record_instance(instance_factory())
    clock.advance(4)
    assert settler.next_quiet_in() == 6
    clock.advance(6)
    assert settler.next_quiet_in() is None  # quiet now: the sweep settles it
    assert settler.run_once()
    assert settler.next_quiet_in() is None


def test_settler_knows_when_the_next_series_of_a_per_series_model_turns_quiet(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    # A per-series model's series is swept for when its own shorter timer ends, not at the
    # next poll: the study's quiet deadline is far later.
    settler = Settler(
        table.settling,
        ["per-series", "whole-study"],
        quiet_s=100,
        clock=clock,
        per_series=["per-series"],
        series_quiet_s=5,
    )
    table.intake.record_instance(instance_factory())
    assert settler.next_quiet_in() == 5
    clock.advance(2)
    table.intake.record_instance(instance_factory())
    assert settler.next_quiet_in() == 5
    clock.advance(5)
    assert settler.run_once()
    assert [j.model for j in table.views.list()] == ["per-series"]
    # The series has its job: only the study's deadline is ahead.
    assert settler.next_quiet_in() == 95
