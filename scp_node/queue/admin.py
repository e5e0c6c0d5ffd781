"""JobAdmin: what an administrator may do to a job (retry, cancel), from the CLI or the web."""

from __future__ import annotations

from sqlalchemy import Engine, select

from scp_node.errors import JobNotFoundError, JobStateError
from scp_node.queue import tx as q
from scp_node.queue.models import (
    TERMINAL_STATES,
    Delivery,
    DeliveryState,
    JobState,
    Level,
    Stage,
)
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.tx import Clock, Sessions, utcnow

__all__ = ["JobAdmin"]


class JobAdmin:
    """Retry and cancel jobs; each call checks the job's state itself (no read first).

    Parameters
    ----------
    engine : Engine
        The migrated job table.
    retry_policy : RetryPolicy
        A job queued again by :meth:`retry` gets this policy's ``max_attempts``.
    clock : Callable[[], datetime]
        Timezone-aware current time (injected by tests).
    """

    def __init__(self, engine: Engine, retry_policy: RetryPolicy, clock: Clock = utcnow) -> None:
        self._tx = Sessions(engine, clock)
        self._retry = retry_policy

    def retry(self, job_id: int) -> None:
        """Retry a finished job.

        A FAILED or CANCELLED job that has a SEG and failed deliveries gets those deliveries
        PENDING again (attempts and first attempt reset) and becomes DELIVERING; any other
        finished job is QUEUED again with attempts reset. The old error stays in the event.

        Raises
        ------
        JobNotFoundError
            If no job has this id.
        JobStateError
            If the job has not finished (queued, running or delivering).
        QueueError
            If the database write fails.
        """
        with self._tx.write("retry") as tx:
            s, now = tx.session, tx.now
            job = q.lock_job(s, job_id)
            if job is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            if job.state not in TERMINAL_STATES:
                raise JobStateError(
                    f"job {job_id} is {job.state.value}; only done, failed or cancelled jobs "
                    "can be retried"
                )
            previous = job.state.value
            old_error = job.error
            failed = s.scalars(
                select(Delivery).where(
                    Delivery.job_id == job.id, Delivery.state == DeliveryState.FAILED
                )
            ).all()
            redeliver = (
                job.state in (JobState.FAILED, JobState.CANCELLED)
                and job.seg_path is not None
                and bool(failed)
            )
            job.error = None
            job.finished_at = None
            q.clear_lease(job)
            if redeliver:
                for delivery in failed:
                    delivery.state = DeliveryState.PENDING
                    delivery.attempts = 0
                    delivery.first_attempt_at = None
                    delivery.next_attempt_at = now
                    delivery.last_error = None
                    delivery.last_status = None
                    q.clear_lease(delivery)
                job.state = JobState.DELIVERING
                job.delivering_at = now
                what = "redelivering to " + ", ".join(d.destination for d in failed)
            else:
                job.state = JobState.QUEUED
                job.attempts = 0
                job.max_attempts = self._retry.max_attempts
                job.not_before = now
                what = "queued again"
            tx.event(
                job,
                q.study_uid(s, job.study_id),
                Stage.RETRY,
                f"admin retry of {previous} job: {what}"
                + (f" (previous error: {old_error})" if old_error else ""),
                data={"previous_state": previous, "previous_error": old_error},
            )

    def cancel(self, job_id: int) -> None:
        """Cancel a job that has not finished.

        Pending deliveries become FAILED with error ``"cancelled"``; a worker or dispatcher
        still holding a lease gets :class:`~scp_node.errors.JobLeaseLostError` on its next call.

        Raises
        ------
        JobNotFoundError
            If no job has this id.
        JobStateError
            If the job has already finished (done, failed or cancelled).
        QueueError
            If the database write fails.
        """
        with self._tx.write("cancel") as tx:
            s, now = tx.session, tx.now
            job = q.lock_job(s, job_id)
            if job is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            if job.state in TERMINAL_STATES:
                raise JobStateError(f"job {job_id} is already {job.state.value}; nothing to cancel")
            previous = job.state.value
            job.state = JobState.CANCELLED
            job.finished_at = now
            q.clear_lease(job)
            pending = s.scalars(
                select(Delivery).where(
                    Delivery.job_id == job.id, Delivery.state == DeliveryState.PENDING
                )
            ).all()
            for delivery in pending:
                delivery.state = DeliveryState.FAILED
                delivery.last_error = "cancelled"
                q.clear_lease(delivery)
            # An operator's doing, not a fault, but the job will not finish: a warning.
            tx.event(
                job,
                q.study_uid(s, job.study_id),
                Stage.CANCEL,
                f"job cancelled (was {previous})",
                level=Level.WARNING,
                data={"previous_state": previous, "deliveries_cancelled": len(pending)},
            )
