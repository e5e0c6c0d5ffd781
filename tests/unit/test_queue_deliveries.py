"""Deliveries on both backends: one per SEG and destination, leased, retried, given up."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scp_node.errors import JobLeaseLostError
from scp_node.queue import (
    DeliveryKind,
    DeliveryState,
    DeliveryTarget,
    JobState,
    Outcome,
    OutputObject,
)
from tests.unit.conftest import ARCHIVE, PACS, POLICY, SERIES, STUDY, FakeClock, Table, claim


def to_delivering(table: Table, job_id: int, dests: list[DeliveryTarget]) -> None:
    """Claim the job and complete it with a SEG for ``dests``."""
    claimed = claim(table)
    state = table.work.complete(
        job_id,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path="/outbox/seg.dcm",
        seg_sop_instance_uid="1.2.3.4.5",
        outcome=Outcome.SEG,
        destinations=dests,
    )
    assert state is JobState.DELIVERING


def test_delivery_success_finishes_job_with_durations(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()  # settle_wait 11 s
    clock.advance(4)
    to_delivering(table, job_id, [PACS, ARCHIVE])
    assert table.deliveries.claim("d", 60) is not None
    second = table.deliveries.claim("d", 60)
    assert second is not None
    assert table.deliveries.claim("d", 60) is None  # both leased
    clock.advance(2)
    table.deliveries.succeeded(second.id, second.token)
    view = table.views.get(job_id)
    assert view.state is JobState.DELIVERING
    first = next(d for d in view.deliveries if d.state is DeliveryState.PENDING)
    with pytest.raises(JobLeaseLostError):
        table.deliveries.succeeded(second.id, second.token)  # already done
    # The first lease lapses; another dispatcher takes it over.
    clock.advance(60)
    table.settling.requeue_expired()
    again = table.deliveries.claim("d2", 60)
    assert again is not None and again.destination == first.destination
    assert again.attempts == 2
    assert (again.path, again.study_instance_uid) == ("/outbox/seg.dcm", STUDY)
    table.deliveries.succeeded(again.id, again.token)
    view = table.views.get(job_id)
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
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    to_delivering(table, job_id, [PACS])
    waits = []
    for _ in range(6):
        d = table.deliveries.claim("d", 30)
        assert d is not None
        state = table.deliveries.failed(d.id, d.token, "association rejected", status=0xA700)
        assert state is DeliveryState.PENDING
        events = table.views.events_after(0, job_id=job_id)
        waits.append(events[-1].message)
        clock.advance(POLICY.backoff_s(d.attempts) - 1)
        assert table.deliveries.claim("d", 30) is None
        clock.advance(1)
    assert "retry in 10s" in waits[0] and "retry in 100s" in waits[-1]
    assert "0xA700" in waits[0]
    clock.advance(POLICY.give_up_after_s)
    d = table.deliveries.claim("d", 30)
    assert d is not None
    assert table.deliveries.failed(d.id, d.token, "connection refused") is DeliveryState.FAILED
    view = table.views.get(job_id)
    assert view.state is JobState.FAILED
    assert view.error == "delivery to pacs gave up after 7 attempts: connection refused"
    (delivery,) = view.deliveries
    assert (delivery.state, delivery.last_error, delivery.last_status) == (
        DeliveryState.FAILED,
        "connection refused",
        None,
    )


def test_dicomweb_target_keeps_its_url(table: Table, job_factory: Callable[..., int]) -> None:
    job_id = job_factory()
    to_delivering(table, job_id, [DeliveryTarget(name="web", url="http://pacs/dicom-web")])
    d = table.deliveries.claim("d", 30)
    assert d is not None
    assert (d.url, d.ae_title, d.host, d.port) == ("http://pacs/dicom-web", "", "", 0)


def test_each_destination_gets_its_objects_and_a_refused_sr_fails_only_its_delivery(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = claim(table)
    seg = OutputObject(DeliveryKind.SEG, "/outbox/seg.dcm", "1.2.3.4.5")
    sr = OutputObject(DeliveryKind.SR, "/outbox/sr.dcm", "1.2.3.4.6")
    labelmap = OutputObject(DeliveryKind.SEG, "/outbox/labelmap.dcm", "1.2.3.4.7")
    measured = [{"segment_number": 1, "label": "liver", "volume_ml": 691.7, "mean": 89.8}]
    state = table.work.complete(
        job_id,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path=seg.path,
        seg_sop_instance_uid=seg.sop_instance_uid,
        outcome=Outcome.SEG,
        destinations=[PACS, ARCHIVE],
        objects={PACS.name: [seg, sr], ARCHIVE.name: [labelmap]},
        measurements=measured,
    )
    assert state is JobState.DELIVERING
    view = table.views.get(job_id)
    assert list(view.measurements) == measured
    assert view.to_json()["measurements"] == measured
    assert sorted((d.destination, d.kind, d.sop_instance_uid) for d in view.deliveries) == [
        ("archive", DeliveryKind.SEG, "1.2.3.4.7"),
        ("pacs", DeliveryKind.SEG, "1.2.3.4.5"),
        ("pacs", DeliveryKind.SR, "1.2.3.4.6"),
    ]
    (inference,) = [e for e in table.views.events_after(0, job_id=job_id) if e.stage == "inference"]
    assert "pacs (seg, sr)" in inference.message and "archive (seg)" in inference.message

    # The PACS takes its SEG and refuses the SR until the SR delivery gives up.
    claimed_all = [table.deliveries.claim("d", 30) for _ in range(3)]
    by_kind = {(c.destination, c.kind): c for c in claimed_all if c is not None}
    assert len(by_kind) == 3
    table.deliveries.succeeded(
        by_kind["pacs", DeliveryKind.SEG].id, by_kind["pacs", DeliveryKind.SEG].token
    )
    refused = by_kind["pacs", DeliveryKind.SR]
    while True:
        after = table.deliveries.failed(
            refused.id, refused.token, "no presentation context", 0x0122
        )
        if after is DeliveryState.FAILED:
            break
        clock.advance(POLICY.give_up_after_s)
        again = table.deliveries.claim("d", 30)
        assert again is not None and again.kind is DeliveryKind.SR
        refused = again
    view = table.views.get(job_id)
    assert view.state is JobState.FAILED
    assert view.error is not None and view.error.startswith("SR delivery to pacs gave up")
    states = {(d.destination, d.kind): d.state for d in view.deliveries}
    assert states == {
        ("pacs", DeliveryKind.SEG): DeliveryState.DONE,
        ("pacs", DeliveryKind.SR): DeliveryState.FAILED,
        ("archive", DeliveryKind.SEG): DeliveryState.PENDING,
    }
    # The archive's LABELMAP SEG goes on and lands.
    archive = by_kind["archive", DeliveryKind.SEG]
    table.deliveries.succeeded(archive.id, archive.token)
    assert {d.state for d in table.views.get(job_id).deliveries if d.destination == "archive"} == {
        DeliveryState.DONE
    }
    # An admin retry resends only the SR: the same file, the same SOP Instance UID.
    table.admin.retry(job_id)
    resent = table.deliveries.claim("d", 30)
    assert resent is not None
    assert (resent.kind, resent.path, resent.sop_instance_uid) == (
        DeliveryKind.SR,
        "/outbox/sr.dcm",
        "1.2.3.4.6",
    )
    assert table.deliveries.claim("d", 30) is None
    table.deliveries.succeeded(resent.id, resent.token)
    view = table.views.get(job_id)
    assert view.state is JobState.DONE
    done = [e for e in table.views.events_after(0, job_id=job_id) if e.stage == "done"]
    assert "SEG delivered to 2 destination(s), 1 SR(s)" in done[-1].message


def test_a_destination_without_objects_gets_no_delivery(
    table: Table, job_factory: Callable[..., int]
) -> None:
    job_id = job_factory()
    claimed = claim(table)
    state = table.work.complete(
        job_id,
        claimed.token,
        series_instance_uid=SERIES,
        seg_path="/outbox/seg.dcm",
        seg_sop_instance_uid="1.2.3.4.5",
        outcome=Outcome.SEG,
        destinations=[PACS],
        objects={},
    )
    assert state is JobState.DONE
    (done,) = [e for e in table.views.events_after(0, job_id=job_id) if e.stage == "done"]
    assert "no destination takes its outputs" in done.message
