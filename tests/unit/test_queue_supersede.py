"""SEG versions on both backends: numbering history, rejection note deliveries that wait for
the superseding SEG, stale deliveries dropped, and the story both jobs tell."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from scp_node.queue import (
    DeliveryKind,
    DeliveryState,
    DeliveryTarget,
    JobState,
    Level,
    Outcome,
    RejectionNote,
    SegVersion,
    Stage,
    Supersession,
)
from tests.unit.conftest import ARCHIVE, PACS, POLICY, STUDY, FakeClock, Table, claim

SEG_SERIES = "2.25.100"
OLD, NEW = "2.25.101", "2.25.102"
NOTE = "2.25.103"
IOCM_PACS = replace(PACS, supersede="iocm")
IOCM_ARCHIVE = replace(ARCHIVE, supersede="iocm")
OTHER_STUDY = STUDY + ".9"


def finish(
    table: Table,
    job_id: int,
    sop: str,
    number: int,
    dests: list[DeliveryTarget],
    supersedes: Supersession | None = None,
) -> JobState:
    """Claim ``job_id`` (the next due job) and complete it with SEG ``sop``."""
    claimed = claim(table)
    assert claimed.id == job_id
    return table.work.complete(
        job_id,
        claimed.token,
        series_instance_uid=STUDY + ".1",
        seg_path=f"/outbox/{job_id}/{sop}.dcm",
        seg_sop_instance_uid=sop,
        outcome=Outcome.SEG,
        destinations=dests,
        seg_series_instance_uid=SEG_SERIES,
        seg_instance_number=number,
        supersedes=supersedes,
    )


def deliver_all(table: Table) -> None:
    """Claim and succeed every claimable delivery."""
    while (delivery := table.deliveries.claim("d", 60)) is not None:
        table.deliveries.succeeded(delivery.id, delivery.token)


def note_for(version: SegVersion, job_id: int) -> RejectionNote:
    return RejectionNote(version, f"/outbox/{job_id}/{NOTE}.dcm", NOTE)


def test_history_numbers_versions_and_says_who_holds_them(
    table: Table, job_factory: Callable[..., int]
) -> None:
    assert table.work.seg_history(SEG_SERIES) == []
    first = job_factory()
    finish(table, first, OLD, 1, [PACS, ARCHIVE])
    (pending,) = table.work.seg_history(SEG_SERIES)
    assert pending == SegVersion(first, OLD, 1, frozenset())  # waiting: not held
    sending = table.deliveries.claim("d", 60)
    assert sending is not None
    (in_flight,) = table.work.seg_history(SEG_SERIES)
    assert in_flight.held_by == {sending.destination}  # being sent counts as held
    table.deliveries.succeeded(sending.id, sending.token)
    deliver_all(table)
    (held,) = table.work.seg_history(SEG_SERIES)
    assert held.held_by == {"pacs", "archive"}
    assert table.views.get(first).state is JobState.DONE


def test_note_waits_for_the_new_seg_and_only_goes_where_the_old_one_is(
    table: Table, job_factory: Callable[..., int]
) -> None:
    first = job_factory()
    finish(table, first, OLD, 1, [IOCM_PACS])
    deliver_all(table)
    (old,) = table.work.seg_history(SEG_SERIES)
    second = job_factory(study=OTHER_STUDY)
    # The worker planned notes for both; the archive never got the old SEG.
    notes = {"pacs": note_for(old, second), "archive": note_for(old, second)}
    state = finish(table, second, NEW, 2, [IOCM_PACS, IOCM_ARCHIVE], Supersession(old, notes))
    assert state is JobState.DELIVERING
    view = table.views.get(second)
    kinds = sorted((d.kind.value, d.destination) for d in view.deliveries)
    assert kinds == [("kos", "pacs"), ("seg", "archive"), ("seg", "pacs")]
    skipped = [e for e in table.views.events_after(0, job_id=second) if e.level is Level.WARNING]
    assert len(skipped) == 1 and "rejection note to archive skipped" in skipped[0].message

    # The note is not claimable before the new SEG is at the PACS.
    seen = []
    while (delivery := table.deliveries.claim("d", 60)) is not None:
        seen.append((delivery.kind, delivery.destination))
        assert delivery.kind is DeliveryKind.SEG
        if delivery.destination == "archive":
            table.deliveries.succeeded(delivery.id, delivery.token)
    assert sorted(seen) == [(DeliveryKind.SEG, "archive"), (DeliveryKind.SEG, "pacs")]
    assert table.deliveries.claim("d", 60) is None  # pacs SEG leased, note waits
    pacs_seg = next(
        d
        for d in table.views.get(second).deliveries
        if d.kind is DeliveryKind.SEG and d.destination == "pacs"
    )
    assert pacs_seg.state is DeliveryState.PENDING


def test_note_is_sent_after_the_seg_and_both_jobs_tell_it(
    table: Table, job_factory: Callable[..., int]
) -> None:
    first = job_factory()
    finish(table, first, OLD, 1, [IOCM_PACS])
    deliver_all(table)
    (old,) = table.work.seg_history(SEG_SERIES)
    second = job_factory(study=OTHER_STUDY)
    finish(table, second, NEW, 2, [IOCM_PACS], Supersession(old, {"pacs": note_for(old, second)}))
    seg = table.deliveries.claim("d", 60)
    assert seg is not None and seg.kind is DeliveryKind.SEG and seg.sop_instance_uid == NEW
    assert table.deliveries.claim("d", 60) is None
    table.deliveries.succeeded(seg.id, seg.token)
    assert table.views.get(second).state is JobState.DELIVERING  # the note is still due
    note = table.deliveries.claim("d", 60)
    assert note is not None and note.kind is DeliveryKind.KOS
    assert (note.sop_instance_uid, note.path) == (NOTE, f"/outbox/{second}/{NOTE}.dcm")
    table.deliveries.succeeded(note.id, note.token)

    view = table.views.get(second)
    assert view.state is JobState.DONE
    assert view.supersedes == SegVersion(first, OLD, 1)
    assert view.superseded_by is None
    assert view.to_json()["supersedes"] == {
        "job_id": first,
        "sop_instance_uid": OLD,
        "instance_number": 1,
    }
    old_view = table.views.get(first)
    assert old_view.superseded_by == SegVersion(second, NEW, 2)
    assert old_view.to_json()["superseded_by"]["sop_instance_uid"] == NEW
    new_story = [e.message for e in table.views.events_after(0, job_id=second)]
    assert f"SEG {NEW} (instance 2) supersedes {OLD} (job {first})" in new_story
    assert any(m.startswith(f"rejection note {NOTE} delivered to pacs") for m in new_story)
    old_story = table.views.events_after(0, job_id=first)
    assert any(
        e.stage is Stage.SUPERSEDE and e.message == f"superseded by {NEW} (job {second})"
        for e in old_story
    )


def test_destination_without_iocm_gets_no_note(
    table: Table, job_factory: Callable[..., int]
) -> None:
    first = job_factory()
    finish(table, first, OLD, 1, [PACS])
    deliver_all(table)
    (old,) = table.work.seg_history(SEG_SERIES)
    second = job_factory(study=OTHER_STUDY)
    finish(table, second, NEW, 2, [PACS], Supersession(old, {"pacs": note_for(old, second)}))
    (only,) = table.views.get(second).deliveries
    assert only.kind is DeliveryKind.SEG


def test_waiting_older_seg_is_dropped_and_one_in_flight_is_not(
    table: Table, job_factory: Callable[..., int]
) -> None:
    first = job_factory()
    finish(table, first, OLD, 1, [PACS, ARCHIVE])
    in_flight = table.deliveries.claim("d", 60)  # pacs: being sent
    assert in_flight is not None
    second = job_factory(study=OTHER_STUDY)
    (old,) = table.work.seg_history(SEG_SERIES)
    finish(table, second, NEW, 2, [PACS, ARCHIVE], Supersession(old))
    by_dest = {d.destination: d for d in table.views.get(first).deliveries}
    waiting = by_dest["archive"]
    assert waiting.state is DeliveryState.FAILED
    assert waiting.last_error == f"superseded by {NEW} (job {second}) before delivery"
    assert by_dest[in_flight.destination].state is DeliveryState.PENDING
    table.deliveries.succeeded(in_flight.id, in_flight.token)
    old_view = table.views.get(first)
    assert old_view.state is JobState.DONE  # nothing failed: the rest was superseded
    done = [e for e in table.views.events_after(0, job_id=first) if e.stage is Stage.DONE]
    assert "1 delivery(ies) dropped as superseded" in done[-1].message


def test_same_seg_again_is_not_dropped(table: Table, job_factory: Callable[..., int]) -> None:
    first = job_factory()
    finish(table, first, OLD, 1, [PACS])
    second = job_factory(study=OTHER_STUDY)
    finish(table, second, OLD, 1, [PACS])  # unchanged input: the same instance
    states = [d.state for d in table.views.get(first).deliveries]
    assert states == [DeliveryState.PENDING]


def test_note_fails_when_its_seg_gives_up(
    table: Table, clock: FakeClock, job_factory: Callable[..., int]
) -> None:
    first = job_factory()
    finish(table, first, OLD, 1, [IOCM_PACS])
    deliver_all(table)
    (old,) = table.work.seg_history(SEG_SERIES)
    second = job_factory(study=OTHER_STUDY)
    finish(table, second, NEW, 2, [IOCM_PACS], Supersession(old, {"pacs": note_for(old, second)}))
    seg = table.deliveries.claim("d", 60)
    assert seg is not None and seg.kind is DeliveryKind.SEG
    clock.advance(POLICY.give_up_after_s + 1)
    assert table.deliveries.failed(seg.id, seg.token, "refused") is DeliveryState.FAILED
    view = table.views.get(second)
    assert view.state is JobState.FAILED
    note = next(d for d in view.deliveries if d.kind is DeliveryKind.KOS)
    assert note.state is DeliveryState.FAILED
    assert note.last_error == "superseding SEG not delivered"
    assert table.deliveries.claim("d", 60) is None


def test_rerun_of_an_older_version_drops_nothing_newer(
    table: Table, job_factory: Callable[..., int]
) -> None:
    first = job_factory()
    finish(table, first, OLD, 1, [PACS])
    second = job_factory(study=OTHER_STUDY)
    finish(table, second, NEW, 2, [PACS])
    assert table.views.get(first).state is JobState.DONE  # its waiting SEG was dropped
    table.admin.retry(first)
    finish(table, first, OLD, 1, [PACS])  # the old input again: its own number, no drop
    (newer,) = table.views.get(second).deliveries
    assert newer.state is DeliveryState.PENDING
