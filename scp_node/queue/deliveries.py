"""Deliveries: the dispatcher's side of the job table, one row per object (a SEG, an SR,
an SC image or a rejection note) and destination."""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from sqlalchemy import Engine, exists, or_, select
from sqlalchemy.orm import aliased

from scp_node.queue import tx as q
from scp_node.queue.models import (
    TERMINAL_STATES,
    Delivery,
    DeliveryKind,
    DeliveryState,
    Job,
    JobState,
    Level,
    Stage,
)
from scp_node.queue.records import ClaimedDelivery
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.tx import Clock, Sessions, utcnow

__all__ = ["Deliveries"]


class Deliveries:
    """Deliveries for dispatchers: claimed under a lease, retried with backoff, given up
    ``give_up_after_s`` after their first attempt.

    Parameters
    ----------
    engine : Engine
        The migrated job table.
    retry_policy : RetryPolicy
        Backoff between attempts and the give-up age.
    clock : Callable[[], datetime]
        Timezone-aware current time (injected by tests).
    """

    def __init__(self, engine: Engine, retry_policy: RetryPolicy, clock: Clock = utcnow) -> None:
        self._tx = Sessions(engine, clock)
        self._retry = retry_policy

    def claim(self, owner: str, lease_s: float) -> ClaimedDelivery | None:
        """Atomically claim the oldest due PENDING delivery without a live lease.

        A rejection note is claimable only once the delivery it depends on (the superseding
        SEG to the same destination) is DONE.

        Parameters
        ----------
        owner : str
            Who claims.
        lease_s : float
            Seconds the lease lasts (> 0); an expired lease makes the delivery claimable.

        Returns
        -------
        ClaimedDelivery or None
            None if nothing is due.

        Raises
        ------
        ValueError
            If ``lease_s`` is not positive.
        QueueError
            If the database write fails.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        dependency = aliased(Delivery)
        landed = exists().where(
            dependency.id == Delivery.depends_on_id, dependency.state == DeliveryState.DONE
        )
        with self._tx.write("claim_delivery") as tx:
            s, now = tx.session, tx.now
            delivery = s.scalars(
                select(Delivery)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                    or_(Delivery.lease_token.is_(None), Delivery.lease_expires_at < now),
                    or_(Delivery.depends_on_id.is_(None), landed),
                )
                .order_by(Delivery.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).one_or_none()
            if delivery is None:
                return None
            job = s.get_one(Job, delivery.job_id)
            token = secrets.token_hex(16)
            delivery.owner = owner
            delivery.lease_token = token
            delivery.lease_expires_at = now + timedelta(seconds=lease_s)
            delivery.attempts += 1
            if delivery.first_attempt_at is None:
                delivery.first_attempt_at = now
            delivery.last_attempt_at = now
            study_uid = q.study_uid(s, job.study_id)
            tx.event(
                job,
                study_uid,
                Stage.DELIVER,
                f"{_what(delivery)} to {delivery.destination} claimed by {owner} "
                f"(attempt {delivery.attempts})",
                data=_data(delivery),
                log_level=logging.DEBUG,
            )
            return ClaimedDelivery(
                id=delivery.id,
                job_id=job.id,
                token=token,
                destination=delivery.destination,
                ae_title=delivery.ae_title,
                host=delivery.host,
                port=delivery.port,
                path=delivery.path,
                sop_instance_uid=delivery.sop_instance_uid,
                study_instance_uid=study_uid,
                attempts=delivery.attempts,
                url=delivery.url,
                kind=delivery.kind,
            )

    def succeeded(self, delivery_id: int, token: str) -> None:
        """Mark a delivery DONE; the job is DONE once every delivery is.

        Raises
        ------
        JobLeaseLostError
            If the delivery is no longer PENDING under this token.
        QueueError
            If the database write fails.
        """
        with self._tx.write("delivery_succeeded") as tx:
            s, now = tx.session, tx.now
            delivery = q.leased_delivery(s, delivery_id, token, "delivery_succeeded")
            delivery.state = DeliveryState.DONE
            delivery.delivered_at = now
            q.clear_lease(delivery)
            job, study_uid = q.delivery_job(s, delivery)
            sent_s = (
                q.seconds(now - delivery.last_attempt_at)
                if delivery.last_attempt_at is not None
                else None
            )
            if delivery.kind == DeliveryKind.KOS:
                tx.event(
                    job,
                    study_uid,
                    Stage.SUPERSEDE,
                    f"rejection note {delivery.sop_instance_uid} delivered to "
                    f"{delivery.destination} (attempt {delivery.attempts})",
                    duration_s=sent_s,
                    data=_data(delivery),
                )
            else:
                tx.event(
                    job,
                    study_uid,
                    Stage.DELIVER,
                    f"{_sent(delivery)}delivered to {delivery.destination} "
                    f"(attempt {delivery.attempts})",
                    duration_s=sent_s,
                    data=_data(delivery),
                )
            q.finish_if_delivered(tx, job, study_uid)

    def failed(
        self,
        delivery_id: int,
        token: str,
        error: str,
        status: int | None = None,
        *,
        final: bool = False,
    ) -> DeliveryState:
        """Record a failed delivery attempt; retry with backoff or give up.

        Deliveries have no attempt cap: they retry until ``give_up_after_s`` has passed since
        their first attempt, then the delivery and its job become FAILED.

        Parameters
        ----------
        delivery_id, token : int, str
            The claimed delivery and the token from :meth:`claim`.
        error : str
            Why it failed (no patient data).
        status : int or None
            The DIMSE (or HTTP) status the destination returned, if any.
        final : bool, optional
            Give up now whatever the delivery's age (the destination refuses this kind of
            object); the job fails with the reason, its other deliveries go on.

        Returns
        -------
        DeliveryState
            PENDING (due after ``backoff_s(attempts)``) or FAILED.

        Raises
        ------
        JobLeaseLostError
            If the delivery is no longer PENDING under this token.
        QueueError
            If the database write fails.
        """
        with self._tx.write("delivery_failed") as tx:
            s, now = tx.session, tx.now
            delivery = q.leased_delivery(s, delivery_id, token, "delivery_failed")
            delivery.last_error = error
            delivery.last_status = status
            q.clear_lease(delivery)
            job, study_uid = q.delivery_job(s, delivery)
            first = delivery.first_attempt_at or now
            status_txt = f" (status 0x{status:04X})" if status is not None else ""
            data = {**_data(delivery), "status": status}
            if final or q.seconds(now - first) >= self._retry.give_up_after_s:
                delivery.state = DeliveryState.FAILED
                how = "refused" if final else f"gave up after {delivery.attempts} attempts"
                reason = f"{_what(delivery)} to {delivery.destination} {how}: {error}{status_txt}"
                if job.state not in TERMINAL_STATES:
                    job.state = JobState.FAILED
                    job.finished_at = now
                    job.error = reason
                tx.event(job, study_uid, Stage.DELIVER, reason, data=data, level=Level.ERROR)
                q.fail_dependents(tx, job, study_uid, delivery, level=Level.ERROR)
            else:
                wait = self._retry.backoff_s(delivery.attempts)
                delivery.next_attempt_at = now + timedelta(seconds=wait)
                tx.event(
                    job,
                    study_uid,
                    Stage.DELIVER,
                    f"{_what(delivery)} to {delivery.destination} failed "
                    f"(attempt {delivery.attempts}), retry in {wait:g}s: {error}{status_txt}",
                    data=data,
                    level=Level.WARNING,
                )
            return delivery.state


_WHAT = {DeliveryKind.KOS: "rejection note", DeliveryKind.SR: "SR", DeliveryKind.SC: "SC image"}


def _what(delivery: Delivery) -> str:
    what = _WHAT.get(delivery.kind)
    return "delivery" if what is None else what if what == "rejection note" else f"{what} delivery"


def _sent(delivery: Delivery) -> str:
    """``"SR "`` before "delivered" for the objects beside the SEG; nothing for a SEG."""
    what = _WHAT.get(delivery.kind)
    return "" if what is None else f"{what} "


def _data(delivery: Delivery) -> dict[str, object]:
    return {
        "destination": delivery.destination,
        "attempt": delivery.attempts,
        "kind": delivery.kind.value,
        "sop_instance_uid": delivery.sop_instance_uid,
    }
