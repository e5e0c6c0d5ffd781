"""The SEG versions of one SEG series, as the job table knows them, and what completing a
new version does to the older ones (internal to the queue).

Every SEG the node makes for one (source series, model, model version) lies in one SEG
series; each job that made one keeps its SOP Instance UID and InstanceNumber. A destination
"holds" a version when its delivery there is DONE, or is being sent now under a live lease
(it will most likely land, so it is retracted like one that did).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from scp_node.queue import tx as q
from scp_node.queue.models import Delivery, DeliveryKind, DeliveryState, Job, Level, Stage
from scp_node.queue.records import DeliveryTarget, SegVersion, Supersession
from scp_node.queue.tx import Tx

__all__ = [
    "drop_stale",
    "held",
    "in_flight",
    "new_delivery",
    "newest_held",
    "record_supersession",
    "seg_versions",
]


#: What a job's result sends (its notes, KOS, wait for their SEG and fail with it).
_RESULT_KINDS = (DeliveryKind.SEG, DeliveryKind.SR, DeliveryKind.SC)


def in_flight(delivery: Delivery, now: datetime) -> bool:
    """True when a PENDING delivery is being sent now (its lease is live)."""
    return (
        delivery.state == DeliveryState.PENDING
        and delivery.lease_token is not None
        and delivery.lease_expires_at is not None
        and delivery.lease_expires_at >= now
    )


def held(delivery: Delivery, now: datetime) -> bool:
    """True when the destination holds the delivery's object or is being sent it now."""
    return delivery.state == DeliveryState.DONE or in_flight(delivery, now)


def seg_versions(session: Session, seg_series_instance_uid: str, now: datetime) -> list[SegVersion]:
    """Every job's SEG in the series, by InstanceNumber then job id, with who holds it."""
    jobs = session.execute(
        select(Job.id, Job.seg_sop_instance_uid, Job.seg_instance_number)
        .where(
            Job.seg_series_instance_uid == seg_series_instance_uid,
            Job.seg_sop_instance_uid.is_not(None),
            Job.seg_instance_number.is_not(None),
        )
        .order_by(Job.seg_instance_number, Job.id)
    ).all()
    holders: dict[int, set[str]] = {}
    if jobs:
        deliveries = session.scalars(
            select(Delivery).where(
                Delivery.job_id.in_([row[0] for row in jobs]),
                Delivery.kind == DeliveryKind.SEG,
                or_(
                    Delivery.state == DeliveryState.DONE,
                    Delivery.state == DeliveryState.PENDING,
                ),
            )
        ).all()
        for delivery in deliveries:
            if held(delivery, now):
                holders.setdefault(delivery.job_id, set()).add(delivery.destination)
    return [
        SegVersion(
            job_id=job_id,
            sop_instance_uid=str(sop_uid),
            instance_number=int(number or 0),
            held_by=frozenset(holders.get(job_id, ())),
        )
        for job_id, sop_uid, number in jobs
    ]


def newest_held(
    versions: list[SegVersion], destination: str, superseding_sop_instance_uid: str
) -> SegVersion | None:
    """The newest version other than ``superseding_sop_instance_uid`` that ``destination``
    holds: the one a rejection note sent there retracts (None: nothing to retract).

    Older versions held there were retracted by the note that came with the next one.
    """
    candidates = [
        v
        for v in versions
        if destination in v.held_by and v.sop_instance_uid != superseding_sop_instance_uid
    ]
    return max(candidates, key=lambda v: (v.instance_number, v.job_id), default=None)


def new_delivery(
    tx: Tx,
    job: Job,
    dest: DeliveryTarget,
    kind: DeliveryKind,
    path: str,
    sop_instance_uid: str,
    depends_on_id: int | None = None,
) -> Delivery:
    delivery = Delivery(
        job_id=job.id,
        destination=dest.name,
        ae_title=dest.ae_title,
        host=dest.host,
        port=dest.port,
        url=dest.url,
        kind=kind,
        path=path,
        sop_instance_uid=sop_instance_uid,
        depends_on_id=depends_on_id,
        state=DeliveryState.PENDING,
        attempts=0,
        next_attempt_at=tx.now,
        created_at=tx.now,
    )
    tx.session.add(delivery)
    return delivery


def drop_stale(tx: Tx, job: Job, seg_series_uid: str, seg_uid: str) -> None:
    """Fail the waiting SEG (and SR, SC) deliveries of older versions of the series (lower
    InstanceNumber, and the notes that wait for them); a delivery being sent right now
    is left to finish. A re-run of an old version drops nothing newer."""
    s, now = tx.session, tx.now
    if job.seg_instance_number is None:
        return
    stale = s.scalars(
        select(Delivery)
        .join(Job, Job.id == Delivery.job_id)
        .where(
            Job.seg_series_instance_uid == seg_series_uid,
            Job.id != job.id,
            Job.seg_instance_number < job.seg_instance_number,
            Delivery.kind.in_(_RESULT_KINDS),
            Delivery.state == DeliveryState.PENDING,
            Delivery.sop_instance_uid != seg_uid,
        )
        .order_by(Delivery.id)
        .with_for_update()
    ).all()
    reason = f"superseded by {seg_uid} (job {job.id}) before delivery"
    for delivery in stale:
        if in_flight(delivery, now):
            continue
        old, old_study = q.delivery_job(s, delivery)
        delivery.state = DeliveryState.FAILED
        delivery.last_error = reason
        q.clear_lease(delivery)
        data = {"destination": delivery.destination, "superseded_by_job": job.id}
        tx.event(
            old,
            old_study,
            Stage.SUPERSEDE,
            f"delivery to {delivery.destination} dropped: {reason}",
            data=data,
        )
        q.fail_dependents(tx, old, old_study, delivery)
        q.finish_if_delivered(tx, old, old_study)


def record_supersession(
    tx: Tx,
    job: Job,
    study_uid: str,
    destinations: Sequence[DeliveryTarget],
    seg_deliveries: dict[str, Delivery],
    supersedes: Supersession,
) -> None:
    """Record which SEG replaced which on both jobs and queue the rejection notes."""
    s, now = tx.session, tx.now
    prev = supersedes.previous
    new_uid = job.seg_sop_instance_uid
    tx.event(
        job,
        study_uid,
        Stage.SUPERSEDE,
        f"SEG {new_uid} (instance {job.seg_instance_number}) supersedes "
        f"{prev.sop_instance_uid} (job {prev.job_id})",
        data={"supersedes": prev.to_json()},
    )
    old = q.lock_job(s, prev.job_id)
    if old is not None and old.id != job.id:
        tx.event(
            old,
            q.study_uid(s, old.study_id),
            Stage.SUPERSEDE,
            f"superseded by {new_uid} (job {job.id})",
            data={"superseded_by_job": job.id, "sop_instance_uid": new_uid},
        )
    assert new_uid is not None and job.seg_series_instance_uid is not None  # complete()
    current = seg_versions(s, job.seg_series_instance_uid, now)
    by_name = {d.name: d for d in destinations}
    for name, note in sorted(supersedes.notes.items()):
        dest, seg_delivery = by_name.get(name), seg_deliveries.get(name)
        if dest is None or seg_delivery is None or dest.supersede != "iocm":
            continue
        held = newest_held(current, name, new_uid)
        if held is None or held.sop_instance_uid != note.rejects.sop_instance_uid:
            now_held = "nothing" if held is None else held.sop_instance_uid
            tx.event(
                job,
                study_uid,
                Stage.SUPERSEDE,
                f"rejection note to {name} skipped: it was made for "
                f"{note.rejects.sop_instance_uid}, {name} now holds {now_held}",
                level=Level.WARNING,
                data={"destination": name},
            )
            continue
        new_delivery(
            tx,
            job,
            dest,
            DeliveryKind.KOS,
            note.path,
            note.sop_instance_uid,
            depends_on_id=seg_delivery.id,
        )
        tx.event(
            job,
            study_uid,
            Stage.SUPERSEDE,
            f"rejection note {note.sop_instance_uid} for {note.rejects.sop_instance_uid} "
            f"(job {note.rejects.job_id}) goes to {name} once {new_uid} is there",
            data={"destination": name, "rejects": note.rejects.to_json()},
        )
