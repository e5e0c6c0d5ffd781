"""Transactions on the job table, event writing and lease checks (internal to the queue).

Every operation of the queue classes is one short transaction from :class:`Sessions`:
``write`` opens a write transaction (SQLite: ``BEGIN IMMEDIATE``; see
:mod:`scp_node.queue.db`) and emits its log lines only once it has committed; ``read`` opens
a read-only one that never waits for a writer. Every state change writes a
:class:`~scp_node.queue.models.JobEvent` (with its :class:`~scp_node.queue.models.Level`) in
the same transaction and logs one line with ``job_id``, ``study_instance_uid``, ``stage``,
``state`` and, where known, ``duration_s``. Only UIDs and ids are logged or stored.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from scp_node.errors import JobLeaseLostError, QueueError
from scp_node.queue.db import READ_ONLY, session_factory
from scp_node.queue.models import (
    Delivery,
    DeliveryKind,
    DeliveryState,
    Job,
    JobEvent,
    JobState,
    Level,
    Stage,
    Study,
)

__all__ = ["Clock", "Sessions", "Tx", "utcnow"]

#: One logger for every job-table line, whichever class wrote it.
logger = logging.getLogger("scp_node.queue")

Clock = Callable[[], datetime]

_LOG_LEVELS = {Level.INFO: logging.INFO, Level.WARNING: logging.WARNING, Level.ERROR: logging.ERROR}


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC (the default clock of the queue)."""
    return datetime.now(UTC)


def iso(value: datetime | None) -> str | None:
    """``value`` in ISO 8601, or None."""
    return None if value is None else value.isoformat()


def seconds(delta: timedelta) -> float:
    """``delta`` in seconds."""
    return delta.total_seconds()


@dataclass
class Tx:
    """An open write transaction, its time, and the log lines to emit once it has committed."""

    session: Session
    now: datetime
    logs: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)

    def event(
        self,
        job: Job,
        study_uid: str,
        stage: Stage,
        message: str,
        *,
        level: Level = Level.INFO,
        state: str | None = None,
        duration_s: float | None = None,
        data: dict[str, Any] | None = None,
        log_level: int | None = None,
    ) -> None:
        """Add a job event and queue its log line.

        ``state`` defaults to the job's state now; ``log_level`` to the Python level of
        ``level`` (routine chatter such as a delivery claim logs at DEBUG).
        """
        event_state = state if state is not None else job.state.value
        self.session.add(
            JobEvent(
                job_id=job.id,
                at=self.now,
                stage=stage,
                state=event_state,
                level=level,
                message=message,
                duration_s=duration_s,
                data=dict(data or {}),
            )
        )
        extra: dict[str, Any] = {
            "job_id": job.id,
            "study_instance_uid": study_uid,
            "stage": stage.value,
            "state": event_state,
        }
        if duration_s is not None:
            extra["duration_s"] = duration_s
        self.logs.append((_LOG_LEVELS[level] if log_level is None else log_level, message, extra))


class Sessions:
    """Short transactions on one engine, with an injectable clock.

    Parameters
    ----------
    engine : Engine
        From :func:`scp_node.queue.db.make_engine`, migrated.
    clock : Callable[[], datetime]
        Returns the current time, timezone-aware. Injected so tests control time.
    """

    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._clock = clock
        self._sessions = session_factory(engine)

    def now(self) -> datetime:
        """The clock's time in UTC.

        Raises
        ------
        ValueError
            If the clock returned a naive datetime.
        """
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock returned a naive datetime; it must be timezone-aware")
        return now.astimezone(UTC)

    @contextmanager
    def write(self, op: str) -> Iterator[Tx]:
        """One write transaction; its log lines are emitted after the commit.

        Raises
        ------
        QueueError
            If the database fails (wraps the SQLAlchemy error; ``__cause__`` is it).
        """
        tx: Tx | None = None
        try:
            with self._sessions.begin() as session:
                tx = Tx(session=session, now=self.now())
                yield tx
        except SQLAlchemyError as exc:
            raise QueueError(f"job table: {op} failed: {exc}") from exc
        assert tx is not None
        for level, msg, extra in tx.logs:
            logger.log(level, msg, extra=extra)

    @contextmanager
    def read(self, op: str) -> Iterator[Session]:
        """One read-only transaction (never waits for a writer on SQLite).

        Raises
        ------
        QueueError
            If the database fails.
        """
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{READ_ONLY: True})
                with Session(bind=conn, expire_on_commit=False) as session:
                    yield session
        except SQLAlchemyError as exc:
            raise QueueError(f"job table: {op} failed: {exc}") from exc


def study_uid(session: Session, study_id: int) -> str:
    """The Study Instance UID of a study row."""
    return session.execute(
        select(Study.study_instance_uid).where(Study.id == study_id)
    ).scalar_one()


def lock_job(session: Session, job_id: int) -> Job | None:
    """The job row, locked for this transaction; None if there is none."""
    return session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()


def delivery_job(session: Session, delivery: Delivery) -> tuple[Job, str]:
    """The job ``delivery`` belongs to, locked for this transaction, and its Study
    Instance UID (the foreign key guarantees the job)."""
    job = lock_job(session, delivery.job_id)
    assert job is not None  # foreign key
    return job, study_uid(session, job.study_id)


def leased_job(session: Session, job_id: int, token: str, op: str) -> Job:
    """The job, locked, if it is RUNNING under ``token``.

    Raises
    ------
    JobLeaseLostError
        If the job does not exist or is no longer RUNNING under this token.
    """
    job = lock_job(session, job_id)
    if job is None:
        raise JobLeaseLostError(f"job {job_id}: {op}: no such job")
    if job.state != JobState.RUNNING or job.lease_token != token:
        raise JobLeaseLostError(
            f"job {job_id}: {op}: lease lost (state {job.state.value}, token "
            f"{'matches' if job.lease_token == token else 'replaced'})"
        )
    return job


def leased_delivery(session: Session, delivery_id: int, token: str, op: str) -> Delivery:
    """The delivery, locked, if it is PENDING under ``token``.

    Raises
    ------
    JobLeaseLostError
        If the delivery does not exist or is no longer PENDING under this token.
    """
    delivery = session.scalars(
        select(Delivery).where(Delivery.id == delivery_id).with_for_update()
    ).one_or_none()
    if delivery is None:
        raise JobLeaseLostError(f"delivery {delivery_id}: {op}: no such delivery")
    if delivery.state != DeliveryState.PENDING or delivery.lease_token != token:
        raise JobLeaseLostError(
            f"delivery {delivery_id}: {op}: lease lost (state {delivery.state.value})"
        )
    return delivery


def clear_lease(row: Job | Delivery) -> None:
    """Forget the owner, token and expiry of a job or delivery."""
    row.owner = None
    row.lease_token = None
    row.lease_expires_at = None


def add_durations(job: Job, **durations: float) -> None:
    """Merge ``durations`` (stage -> seconds) into the job's."""
    # A new dict: the JSON column does not track in-place mutation.
    job.durations = {**(job.durations or {}), **durations}


def total_s(job: Job, now: datetime) -> float:
    """Seconds from the study's last instance to ``now``."""
    settle_wait = float((job.durations or {}).get("settle_wait", 0.0))
    return seconds(now - job.created_at) + settle_wait


def fail_dependents(
    tx: Tx, job: Job, study_uid: str, delivery: Delivery, *, level: Level = Level.INFO
) -> None:
    """Fail the rejection notes that wait for ``delivery``, which will never be DONE."""
    notes = tx.session.scalars(
        select(Delivery)
        .where(Delivery.depends_on_id == delivery.id, Delivery.state == DeliveryState.PENDING)
        .with_for_update()
    ).all()
    for note in notes:
        note.state = DeliveryState.FAILED
        note.last_error = "superseding SEG not delivered"
        clear_lease(note)
        tx.event(
            job,
            study_uid,
            Stage.DELIVER,
            f"rejection note to {note.destination} failed: superseding SEG not delivered",
            level=level,
            data={"destination": note.destination, "kind": note.kind.value},
        )


def finish_if_delivered(tx: Tx, job: Job, study_uid: str) -> None:
    """Make a DELIVERING job DONE once none of its deliveries is PENDING.

    A delivery that failed for good fails its job at once, so the FAILED ones met here
    were dropped because a newer SEG superseded them (or their notes with them).
    """
    if job.state != JobState.DELIVERING:
        return
    rows = tx.session.execute(
        select(Delivery.state, Delivery.kind).where(Delivery.job_id == job.id)
    ).all()
    if any(state == DeliveryState.PENDING for state, _kind in rows):
        return
    now = tx.now
    job.state = JobState.DONE
    job.finished_at = now
    total = total_s(job, now)
    durations = {"total": total}
    if job.delivering_at is not None:
        durations["delivery"] = seconds(now - job.delivering_at)
    add_durations(job, **durations)
    done = Counter(kind for st, kind in rows if st == DeliveryState.DONE)
    dropped = sum(st != DeliveryState.DONE for st, _kind in rows)
    message = f"job done: SEG delivered to {done[DeliveryKind.SEG]} destination(s)"
    if done[DeliveryKind.SR]:
        message += f", {done[DeliveryKind.SR]} SR(s)"
    if done[DeliveryKind.SC]:
        message += f", {done[DeliveryKind.SC]} SC image(s)"
    if done[DeliveryKind.KOS]:
        message += f", {done[DeliveryKind.KOS]} rejection note(s)"
    if dropped:
        message += f"; {dropped} delivery(ies) dropped as superseded"
    tx.event(
        job,
        study_uid,
        Stage.DONE,
        message,
        duration_s=total,
        data={"outcome": None if job.outcome is None else job.outcome.value},
    )
