"""The SEG versions of one SEG series, as the job table knows them (internal to the queue).

Every SEG the node makes for one (source series, model, model version) lies in one SEG
series; each job that made one keeps its SOP Instance UID and InstanceNumber. A destination
"holds" a version when its delivery there is DONE, or is being sent now under a live lease
(it will most likely land, so it is retracted like one that did).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from scp_node.queue.models import Delivery, DeliveryKind, DeliveryState, Job
from scp_node.queue.records import SegVersion

__all__ = ["held", "in_flight", "newest_held", "seg_versions"]


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
