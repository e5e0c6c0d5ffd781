"""JobStore: every read and write of the job table, each its own short transaction.

Inputs and outputs are frozen dataclasses; no ORM object leaves this module. Every state
change writes a :class:`~scp_node.queue.models.JobEvent` in the same transaction and logs one
line (after commit) with ``job_id``, ``study_instance_uid``, ``stage``, ``state`` and, where
known, ``duration_s``. Only UIDs and ids are logged or stored; never patient data.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from scp_node.errors import JobLeaseLostError, NodeError
from scp_node.queue.db import READ_ONLY, session_factory
from scp_node.queue.models import (
    TERMINAL_STATES,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobEvent,
    JobState,
    Series,
    Study,
)
from scp_node.queue.retry import RetryPolicy
from scp_node.settings import Destination

__all__ = [
    "ClaimedDelivery",
    "ClaimedJob",
    "DeliveryView",
    "InstanceRecord",
    "JobEventView",
    "JobStore",
    "JobView",
    "SeriesInfo",
    "utcnow",
]

logger = logging.getLogger(__name__)

_RECORD_TRIES = 3


def utcnow() -> datetime:
    """Return the current time, timezone-aware UTC (the default clock of :class:`JobStore`)."""
    return datetime.now(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _seconds(delta: timedelta) -> float:
    return delta.total_seconds()


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as written to the spool, to be recorded (no patient data)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    path: str
    size_bytes: int
    calling_ae: str
    series_number: int | None = None
    series_description: str | None = None
    #: DICOM DA (YYYYMMDD).
    study_date: str | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """What series selection needs to know about one series of a study."""

    series_instance_uid: str
    modality: str | None
    instance_count: int
    series_description: str | None
    series_number: int | None


@dataclass(frozen=True)
class UnsettledStudy:
    """A study with instances no job covers yet (what a completeness check needs)."""

    study_instance_uid: str
    last_received_at: datetime
    instance_count: int
    calling_aes: frozenset[str]
    #: Series Instance UID -> instances received.
    series_counts: dict[str, int]


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker now holds; ``token`` proves the lease in every later call."""

    id: int
    token: str
    study_instance_uid: str
    model: str
    attempts: int


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery a dispatcher now holds; ``token`` proves the lease."""

    id: int
    job_id: int
    token: str
    destination: str
    ae_title: str
    host: str
    port: int
    seg_path: str
    seg_sop_instance_uid: str | None
    study_instance_uid: str
    attempts: int
    #: DICOMweb root for a ``dicomweb`` destination; None means C-STORE.
    url: str | None = None


@dataclass(frozen=True)
class DeliveryView:
    """A delivery as shown by the CLI and the dashboard."""

    destination: str
    ae_title: str
    host: str
    port: int
    state: DeliveryState
    attempts: int
    last_error: str | None
    last_status: int | None
    delivered_at: datetime | None
    #: DICOMweb root for a ``dicomweb`` destination; None means C-STORE.
    url: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ISO 8601 timestamps, enum values as strings)."""
        return {
            "destination": self.destination,
            "ae_title": self.ae_title,
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "state": self.state.value,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "last_status": self.last_status,
            "delivered_at": _iso(self.delivered_at),
        }


@dataclass(frozen=True)
class JobView:
    """A job as shown by the CLI and the dashboard."""

    id: int
    state: JobState
    study_instance_uid: str
    study_date: str | None
    model: str
    attempts: int
    max_attempts: int
    error: str | None
    outcome: str | None
    series_instance_uid: str | None
    seg_sop_instance_uid: str | None
    seg_path: str | None
    created_at: datetime
    claimed_at: datetime | None
    finished_at: datetime | None
    durations: dict[str, float] = field(default_factory=dict)
    deliveries: tuple[DeliveryView, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ISO 8601 timestamps, enum values as strings)."""
        return {
            "id": self.id,
            "state": self.state.value,
            "study_instance_uid": self.study_instance_uid,
            "study_date": self.study_date,
            "model": self.model,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "error": self.error,
            "outcome": self.outcome,
            "series_instance_uid": self.series_instance_uid,
            "seg_sop_instance_uid": self.seg_sop_instance_uid,
            "seg_path": self.seg_path,
            "created_at": _iso(self.created_at),
            "claimed_at": _iso(self.claimed_at),
            "finished_at": _iso(self.finished_at),
            "durations": dict(self.durations),
            "deliveries": [d.to_json() for d in self.deliveries],
        }


@dataclass(frozen=True)
class JobEventView:
    """One event of a job's story; ``id`` grows monotonically."""

    id: int
    job_id: int
    at: datetime
    stage: str
    state: str
    message: str
    duration_s: float | None
    study_instance_uid: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ISO 8601 timestamp)."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "at": self.at.isoformat(),
            "stage": self.stage,
            "state": self.state,
            "message": self.message,
            "duration_s": self.duration_s,
            "study_instance_uid": self.study_instance_uid,
            "data": dict(self.data),
        }


@dataclass
class _Tx:
    """An open write transaction and the log lines to emit once it has committed."""

    session: Session
    now: datetime
    logs: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)


class JobStore:
    """The job table: instances in, jobs claimed and finished, deliveries tracked.

    Parameters
    ----------
    engine : Engine
        From :func:`scp_node.queue.db.make_engine`, migrated with
        :func:`scp_node.queue.db.upgrade`.
    retry : RetryPolicy
        Attempts, backoff and delivery give-up age.
    clock : Callable[[], datetime]
        Returns the current time, timezone-aware. Injected so tests control time.

    Notes
    -----
    Every method is one short transaction. SQLAlchemy errors are wrapped in
    :class:`~scp_node.errors.NodeError`.
    """

    def __init__(
        self,
        engine: Engine,
        retry: RetryPolicy,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._retry = retry
        self._clock = clock
        self._sessions = session_factory(engine)

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy this store applies."""
        return self._retry

    # -- plumbing ---------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("clock returned a naive datetime; it must be timezone-aware")
        return now.astimezone(UTC)

    @contextmanager
    def _write(self, op: str) -> Iterator[_Tx]:
        tx: _Tx | None = None
        try:
            with self._sessions.begin() as session:
                tx = _Tx(session=session, now=self._now())
                yield tx
        except SQLAlchemyError as exc:
            raise NodeError(f"job table: {op} failed: {exc}") from exc
        assert tx is not None
        for level, msg, extra in tx.logs:
            logger.log(level, msg, extra=extra)

    @contextmanager
    def _read(self, op: str) -> Iterator[Session]:
        try:
            with self._engine.connect() as conn:
                conn.execution_options(**{READ_ONLY: True})
                with Session(bind=conn, expire_on_commit=False) as session:
                    yield session
        except SQLAlchemyError as exc:
            raise NodeError(f"job table: {op} failed: {exc}") from exc

    @staticmethod
    def _study_uid(session: Session, study_id: int) -> str:
        return session.execute(
            select(Study.study_instance_uid).where(Study.id == study_id)
        ).scalar_one()

    def _event(
        self,
        tx: _Tx,
        job: Job,
        study_uid: str,
        stage: str,
        message: str,
        *,
        state: str | None = None,
        duration_s: float | None = None,
        data: dict[str, Any] | None = None,
        level: int = logging.INFO,
    ) -> None:
        event_state = state if state is not None else job.state.value
        tx.session.add(
            JobEvent(
                job_id=job.id,
                at=tx.now,
                stage=stage,
                state=event_state,
                message=message,
                duration_s=duration_s,
                data=dict(data or {}),
            )
        )
        extra: dict[str, Any] = {
            "job_id": job.id,
            "study_instance_uid": study_uid,
            "stage": stage,
            "state": event_state,
        }
        if duration_s is not None:
            extra["duration_s"] = duration_s
        tx.logs.append((level, message, extra))

    @staticmethod
    def _lock_job(session: Session, job_id: int) -> Job | None:
        return session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()

    def _leased_job(self, session: Session, job_id: int, token: str, op: str) -> Job:
        job = self._lock_job(session, job_id)
        if job is None:
            raise JobLeaseLostError(f"job {job_id}: {op}: no such job")
        if job.state != JobState.RUNNING or job.lease_token != token:
            raise JobLeaseLostError(
                f"job {job_id}: {op}: lease lost (state {job.state.value}, token "
                f"{'matches' if job.lease_token == token else 'replaced'})"
            )
        return job

    @staticmethod
    def _lock_delivery(session: Session, delivery_id: int, token: str, op: str) -> Delivery:
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

    @staticmethod
    def _clear_lease(row: Job | Delivery) -> None:
        row.owner = None
        row.lease_token = None
        row.lease_expires_at = None

    @staticmethod
    def _add_durations(job: Job, **durations: float) -> None:
        # A new dict: the JSON column does not track in-place mutation.
        job.durations = {**(job.durations or {}), **durations}

    @staticmethod
    def _total_s(job: Job, now: datetime) -> float:
        settle_wait = float((job.durations or {}).get("settle_wait", 0.0))
        return _seconds(now - job.created_at) + settle_wait

    # -- receive ----------------------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Record a stored instance; a re-sent SOP Instance UID replaces its row.

        Creates the study and series on first sight, counts distinct instances and moves the
        study's ``last_received_at`` to now (so the settle sweep waits again). Safe to call
        from several threads or processes at once.

        Parameters
        ----------
        rec : InstanceRecord
            The instance, already durable at ``rec.path``.

        Returns
        -------
        bool
            True if the SOP Instance UID was new, False if it replaced an earlier copy.

        Raises
        ------
        NodeError
            If the database write fails.
        """
        for attempt in range(1, _RECORD_TRIES + 1):
            try:
                with self._write("record_instance") as tx:
                    return self._upsert_instance(tx, rec)
            except NodeError as exc:
                # Two processes creating the same study/series at once (PostgreSQL): the
                # loser sees a unique violation and retries, finding the winner's row.
                if attempt == _RECORD_TRIES or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _upsert_instance(self, tx: _Tx, rec: InstanceRecord) -> bool:
        s, now = tx.session, tx.now
        study = s.scalars(
            select(Study)
            .where(Study.study_instance_uid == rec.study_instance_uid)
            .with_for_update()
        ).one_or_none()
        if study is None:
            study = Study(
                study_instance_uid=rec.study_instance_uid,
                study_date=rec.study_date,
                first_received_at=now,
                last_received_at=now,
                instance_count=0,
            )
            s.add(study)
            s.flush()
        elif study.study_date is None and rec.study_date:
            study.study_date = rec.study_date

        series = s.scalars(
            select(Series)
            .where(Series.series_instance_uid == rec.series_instance_uid)
            .with_for_update()
        ).one_or_none()
        if series is None:
            series = Series(
                study_id=study.id,
                series_instance_uid=rec.series_instance_uid,
                modality=rec.modality,
                series_number=rec.series_number,
                series_description=rec.series_description,
                instance_count=0,
            )
            s.add(series)
            s.flush()
        else:
            series.modality = series.modality or rec.modality
            if series.series_number is None:
                series.series_number = rec.series_number
            series.series_description = series.series_description or rec.series_description

        instance = s.scalars(
            select(Instance)
            .where(Instance.sop_instance_uid == rec.sop_instance_uid)
            .with_for_update()
        ).one_or_none()
        is_new = instance is None
        if instance is None:
            s.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=rec.sop_instance_uid,
                    sop_class_uid=rec.sop_class_uid,
                    transfer_syntax_uid=rec.transfer_syntax_uid,
                    path=rec.path,
                    size_bytes=rec.size_bytes,
                    calling_ae=rec.calling_ae,
                    received_at=now,
                )
            )
            series.instance_count += 1
            study.instance_count += 1
        else:
            if instance.series_id != series.id:
                # Re-sent under another series: keep the counts true.
                old = s.get(Series, instance.series_id)
                if old is not None:
                    old.instance_count -= 1
                    if old.study_id != series.study_id:
                        old_study = s.get(Study, old.study_id)
                        if old_study is not None:
                            old_study.instance_count -= 1
                        study.instance_count += 1
                series.instance_count += 1
                instance.series_id = series.id
            instance.sop_class_uid = rec.sop_class_uid
            instance.transfer_syntax_uid = rec.transfer_syntax_uid
            instance.path = rec.path
            instance.size_bytes = rec.size_bytes
            instance.calling_ae = rec.calling_ae
            instance.received_at = now
        study.last_received_at = max(study.last_received_at, now)
        tx.logs.append(
            (
                logging.DEBUG,
                "instance recorded" if is_new else "instance replaced",
                {
                    "study_instance_uid": rec.study_instance_uid,
                    "series_instance_uid": rec.series_instance_uid,
                    "sop_instance_uid": rec.sop_instance_uid,
                    "stage": "receive",
                },
            )
        )
        return is_new

    # -- settle -----------------------------------------------------------------------------

    def settle(
        self,
        quiet_s: float,
        models: Sequence[str],
        *,
        only: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> list[int]:
        """Turn studies quiet for ``quiet_s`` into one QUEUED job per model.

        A study is settled when its ``last_received_at`` is at least ``quiet_s`` old and not
        yet covered by ``settled_through``. No job is added for a model that already has a
        QUEUED job for the study (that job will see every instance when it runs). A study
        that receives instances after its job ran therefore gets a new job.

        Parameters
        ----------
        quiet_s : float
            Seconds without a new instance before a study becomes jobs (>= 0).
        models : Sequence[str]
            Model names; one job per model.
        only : Collection[str] or None
            Settle only these studies (Study Instance UIDs); None means any.
        exclude : Collection[str]
            Never settle these studies now (e.g. known to be incomplete).

        Returns
        -------
        list[int]
            Ids of the jobs created, in creation order.

        Raises
        ------
        ValueError
            If ``quiet_s`` is negative.
        NodeError
            If the database write fails.
        """
        if quiet_s < 0:
            raise ValueError(f"quiet_s must be >= 0, got {quiet_s}")
        created: list[int] = []
        with self._write("settle") as tx:
            s, now = tx.session, tx.now
            cutoff = now - timedelta(seconds=quiet_s)
            studies = s.scalars(
                select(Study)
                .where(
                    Study.last_received_at <= cutoff,
                    or_(
                        Study.settled_through.is_(None),
                        Study.last_received_at > Study.settled_through,
                    ),
                )
                .order_by(Study.id)
                .with_for_update(skip_locked=True)
            ).all()
            for study in studies:
                uid = study.study_instance_uid
                if (only is not None and uid not in only) or uid in exclude:
                    continue
                settle_wait = _seconds(now - study.last_received_at)
                receive = _seconds(study.last_received_at - study.first_received_at)
                for model in models:
                    waiting = s.execute(
                        select(Job.id)
                        .where(
                            Job.study_id == study.id,
                            Job.model == model,
                            Job.state == JobState.QUEUED,
                        )
                        .limit(1)
                    ).scalar_one_or_none()
                    if waiting is not None:
                        continue
                    job = Job(
                        study_id=study.id,
                        model=model,
                        state=JobState.QUEUED,
                        attempts=0,
                        max_attempts=self._retry.max_attempts,
                        not_before=now,
                        created_at=now,
                        durations={"receive": receive, "settle_wait": settle_wait},
                    )
                    s.add(job)
                    s.flush()
                    self._event(
                        tx,
                        job,
                        study.study_instance_uid,
                        "settled",
                        f"study settled: {study.instance_count} instances, job queued for "
                        f"model {model}",
                        duration_s=settle_wait,
                        data={"instance_count": study.instance_count, "receive_s": receive},
                    )
                    created.append(job.id)
                study.settled_through = study.last_received_at
        return created

    def unsettled_studies(self) -> list[UnsettledStudy]:
        """Studies whose latest instances no job covers yet, oldest first.

        Raises
        ------
        NodeError
            If the database read fails.
        """
        with self._read("unsettled_studies") as s:
            studies = s.scalars(
                select(Study)
                .where(
                    or_(
                        Study.settled_through.is_(None),
                        Study.last_received_at > Study.settled_through,
                    )
                )
                .order_by(Study.id)
            ).all()
            found: list[UnsettledStudy] = []
            for study in studies:
                series = s.execute(
                    select(Series.series_instance_uid, Series.instance_count).where(
                        Series.study_id == study.id
                    )
                ).all()
                aes = s.scalars(
                    select(Instance.calling_ae)
                    .join(Series, Instance.series_id == Series.id)
                    .where(Series.study_id == study.id)
                    .distinct()
                ).all()
                found.append(
                    UnsettledStudy(
                        study_instance_uid=study.study_instance_uid,
                        last_received_at=study.last_received_at,
                        instance_count=study.instance_count,
                        calling_aes=frozenset(aes),
                        series_counts={uid: count for uid, count in series},
                    )
                )
            return found

    # -- reads for the worker ---------------------------------------------------------------

    def study_series(self, study_instance_uid: str) -> dict[str, list[Path]]:
        """Map each series of a study to its instance files.

        Parameters
        ----------
        study_instance_uid : str
            The study.

        Returns
        -------
        dict[str, list[Path]]
            Series Instance UID -> file paths in the order received; empty if unknown.

        Raises
        ------
        NodeError
            If the database read fails.
        """
        result: dict[str, list[Path]] = {}
        with self._read("study_series") as s:
            rows = s.execute(
                select(Series.series_instance_uid, Instance.path)
                .join(Instance, Instance.series_id == Series.id)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_instance_uid)
                .order_by(Series.id, Instance.id)
            ).all()
        for series_uid, path in rows:
            result.setdefault(series_uid, []).append(Path(path))
        return result

    def series_info(self, study_instance_uid: str) -> list[SeriesInfo]:
        """Describe each series of a study (for series selection rules).

        Parameters
        ----------
        study_instance_uid : str
            The study.

        Returns
        -------
        list[SeriesInfo]
            In the order the series were first received; empty if the study is unknown.

        Raises
        ------
        NodeError
            If the database read fails.
        """
        with self._read("series_info") as s:
            rows = s.scalars(
                select(Series)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid == study_instance_uid)
                .order_by(Series.id)
            ).all()
            return [
                SeriesInfo(
                    series_instance_uid=r.series_instance_uid,
                    modality=r.modality,
                    instance_count=r.instance_count,
                    series_description=r.series_description,
                    series_number=r.series_number,
                )
                for r in rows
            ]

    def instance_paths(self, study_instance_uid: str) -> list[Path]:
        """Return every instance file of a study (series by series, in order received).

        Parameters
        ----------
        study_instance_uid : str
            The study.

        Returns
        -------
        list[Path]

        Raises
        ------
        NodeError
            If the database read fails.
        """
        return [p for paths in self.study_series(study_instance_uid).values() for p in paths]

    def has_instance(self, sop_instance_uid: str) -> bool:
        """Tell whether a SOP Instance UID has been recorded.

        Parameters
        ----------
        sop_instance_uid : str
            The instance.

        Returns
        -------
        bool

        Raises
        ------
        NodeError
            If the database read fails.
        """
        with self._read("has_instance") as s:
            found = s.execute(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
        return found is not None

    # -- worker -----------------------------------------------------------------------------

    def claim(self, owner: str, lease_s: float) -> ClaimedJob | None:
        """Atomically claim the oldest QUEUED job that is due.

        Parameters
        ----------
        owner : str
            Who claims (e.g. ``host:pid:thread``); shown in the job and its events.
        lease_s : float
            Seconds the lease lasts unless renewed by :meth:`heartbeat` (> 0).

        Returns
        -------
        ClaimedJob or None
            None if no job is due.

        Raises
        ------
        ValueError
            If ``lease_s`` is not positive.
        NodeError
            If the database write fails.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        with self._write("claim") as tx:
            s, now = tx.session, tx.now
            job = s.scalars(
                select(Job)
                .where(Job.state == JobState.QUEUED, Job.not_before <= now)
                .order_by(Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).one_or_none()
            if job is None:
                return None
            token = secrets.token_hex(16)
            job.state = JobState.RUNNING
            job.owner = owner
            job.lease_token = token
            job.lease_expires_at = now + timedelta(seconds=lease_s)
            job.heartbeat_at = now
            job.claimed_at = now
            job.attempts += 1
            queue_wait: float | None = None
            if job.started_at is None:
                job.started_at = now
                queue_wait = _seconds(now - job.created_at)
                self._add_durations(job, queue_wait=queue_wait)
            study_uid = self._study_uid(s, job.study_id)
            self._event(
                tx,
                job,
                study_uid,
                "claim",
                f"job claimed by {owner} (attempt {job.attempts} of {job.max_attempts})",
                duration_s=queue_wait,
                data={"owner": owner, "attempt": job.attempts},
            )
            return ClaimedJob(
                id=job.id,
                token=token,
                study_instance_uid=study_uid,
                model=job.model,
                attempts=job.attempts,
            )

    def heartbeat(self, job_id: int, token: str, lease_s: float) -> None:
        """Extend a job's lease to ``lease_s`` seconds from now.

        Parameters
        ----------
        job_id : int
            The claimed job.
        token : str
            The token from :meth:`claim`.
        lease_s : float
            New lease length (> 0).

        Raises
        ------
        ValueError
            If ``lease_s`` is not positive.
        JobLeaseLostError
            If the job is no longer RUNNING under this token (requeued, cancelled, reclaimed).
        NodeError
            If the database write fails.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        with self._write("heartbeat") as tx:
            job = self._leased_job(tx.session, job_id, token, "heartbeat")
            job.lease_expires_at = tx.now + timedelta(seconds=lease_s)
            job.heartbeat_at = tx.now

    def record_stage(
        self,
        job_id: int,
        token: str,
        stage: str,
        duration_s: float,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        """Record that a stage of a claimed job finished and how long it took.

        Parameters
        ----------
        job_id : int
            The claimed job.
        token : str
            The token from :meth:`claim`.
        stage : str
            Stage name, e.g. ``"select"``, ``"load"``, ``"predict"``, ``"seg"``.
        duration_s : float
            Seconds the stage took; stored in the job's ``durations[stage]``.
        message : str
            Free text for the event (UIDs and numbers only, never patient data).
        data : dict or None
            JSON-serialisable details.

        Raises
        ------
        JobLeaseLostError
            If the job is no longer RUNNING under this token.
        NodeError
            If the database write fails.
        """
        with self._write("record_stage") as tx:
            job = self._leased_job(tx.session, job_id, token, f"record_stage {stage}")
            self._add_durations(job, **{stage: duration_s})
            self._event(
                tx,
                job,
                self._study_uid(tx.session, job.study_id),
                stage,
                message or f"{stage} done",
                duration_s=duration_s,
                data=data,
            )

    def complete_inference(
        self,
        job_id: int,
        token: str,
        *,
        series_instance_uid: str | None,
        seg_path: str | None,
        seg_sop_instance_uid: str | None,
        outcome: str,
        destinations: Sequence[Destination],
    ) -> JobState:
        """Finish the inference of a claimed job.

        With a SEG and at least one destination the job becomes DELIVERING with one PENDING
        delivery per destination (due now); otherwise it is DONE. The lease is released.
        Deliveries left from an earlier run of the same job are replaced.

        Parameters
        ----------
        job_id : int
            The claimed job.
        token : str
            The token from :meth:`claim`.
        series_instance_uid : str or None
            The series inference ran on.
        seg_path : str or None
            The SEG file in the outbox, or None if none was written.
        seg_sop_instance_uid : str or None
            The SEG's SOP Instance UID.
        outcome : str
            e.g. ``"seg"`` or ``"no_findings"``.
        destinations : Sequence[Destination]
            Where the SEG goes.

        Returns
        -------
        JobState
            DELIVERING or DONE.

        Raises
        ------
        JobLeaseLostError
            If the job is no longer RUNNING under this token; nothing is changed.
        NodeError
            If the database write fails.
        """
        with self._write("complete_inference") as tx:
            s, now = tx.session, tx.now
            job = self._leased_job(s, job_id, token, "complete_inference")
            job.series_instance_uid = series_instance_uid
            job.seg_path = seg_path
            job.seg_sop_instance_uid = seg_sop_instance_uid
            job.outcome = outcome
            job.error = None
            self._clear_lease(job)
            for old in s.scalars(select(Delivery).where(Delivery.job_id == job.id)).all():
                s.delete(old)
            study_uid = self._study_uid(s, job.study_id)
            if seg_path is not None and destinations:
                job.state = JobState.DELIVERING
                job.delivering_at = now
                for dest in destinations:
                    s.add(
                        Delivery(
                            job_id=job.id,
                            destination=dest.name,
                            # A DICOMweb destination has no AE/host/port, only its URL.
                            ae_title=dest.ae_title or "",
                            host=dest.host or "",
                            port=dest.port or 0,
                            url=dest.url,
                            state=DeliveryState.PENDING,
                            attempts=0,
                            next_attempt_at=now,
                            created_at=now,
                        )
                    )
                message = f"inference done ({outcome}); delivering to " + ", ".join(
                    d.name for d in destinations
                )
                self._event(
                    tx,
                    job,
                    study_uid,
                    "inference",
                    message,
                    data={"outcome": outcome, "series_instance_uid": series_instance_uid},
                )
            else:
                job.state = JobState.DONE
                job.finished_at = now
                total = self._total_s(job, now)
                self._add_durations(job, total=total)
                reason = "no SEG" if seg_path is None else "no destinations"
                self._event(
                    tx,
                    job,
                    study_uid,
                    "done",
                    f"job done ({outcome}, {reason})",
                    duration_s=total,
                    data={"outcome": outcome, "series_instance_uid": series_instance_uid},
                )
            return job.state

    def fail(self, job_id: int, token: str, error: str, retryable: bool = True) -> JobState:
        """Record a failed attempt; requeue with backoff or fail for good.

        Parameters
        ----------
        job_id : int
            The claimed job.
        token : str
            The token from :meth:`claim`.
        error : str
            Why it failed (kept on the job and in the event; no patient data).
        retryable : bool
            False fails the job at once whatever attempts remain.

        Returns
        -------
        JobState
            QUEUED (due after ``backoff_s(attempts)``) or FAILED.

        Raises
        ------
        JobLeaseLostError
            If the job is no longer RUNNING under this token.
        NodeError
            If the database write fails.
        """
        with self._write("fail") as tx:
            s, now = tx.session, tx.now
            job = self._leased_job(s, job_id, token, "fail")
            job.error = error
            self._clear_lease(job)
            attempt = f"attempt {job.attempts} of {job.max_attempts}"
            if retryable and job.attempts < job.max_attempts:
                wait = self._retry.backoff_s(job.attempts)
                job.state = JobState.QUEUED
                job.not_before = now + timedelta(seconds=wait)
                message = f"{attempt} failed, retry in {wait:g}s: {error}"
                level = logging.WARNING
            else:
                job.state = JobState.FAILED
                job.finished_at = now
                why = "not retryable" if not retryable else "no attempts left"
                message = f"job failed ({why}, {attempt}): {error}"
                level = logging.ERROR
            self._event(
                tx,
                job,
                self._study_uid(s, job.study_id),
                "fail",
                message,
                data={"retryable": retryable, "attempt": job.attempts},
                level=level,
            )
            return job.state

    def requeue_expired(self) -> list[int]:
        """Requeue RUNNING jobs whose lease expired and release expired delivery leases.

        A job with no attempts left becomes FAILED with error ``"lease expired ..."``.

        Returns
        -------
        list[int]
            Ids of the jobs whose inference lease had expired (requeued or failed).

        Raises
        ------
        NodeError
            If the database write fails.
        """
        expired_ids: list[int] = []
        with self._write("requeue_expired") as tx:
            s, now = tx.session, tx.now
            jobs = s.scalars(
                select(Job)
                .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
                .order_by(Job.id)
                .with_for_update(skip_locked=True)
            ).all()
            for job in jobs:
                error = (
                    f"lease expired (owner {job.owner}, attempt {job.attempts} of "
                    f"{job.max_attempts}, last heartbeat {_iso(job.heartbeat_at)})"
                )
                self._clear_lease(job)
                job.error = error
                if job.attempts >= job.max_attempts:
                    job.state = JobState.FAILED
                    job.finished_at = now
                    message = f"job failed: {error}"
                else:
                    job.state = JobState.QUEUED
                    job.not_before = now
                    message = f"job requeued: {error}"
                self._event(
                    tx,
                    job,
                    self._study_uid(s, job.study_id),
                    "requeue",
                    message,
                    level=logging.WARNING,
                )
                expired_ids.append(job.id)
            deliveries = s.scalars(
                select(Delivery)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.lease_token.is_not(None),
                    Delivery.lease_expires_at < now,
                )
                .order_by(Delivery.id)
                .with_for_update(skip_locked=True)
            ).all()
            for delivery in deliveries:
                owner = delivery.owner
                self._clear_lease(delivery)
                job = s.get_one(Job, delivery.job_id)
                self._event(
                    tx,
                    job,
                    self._study_uid(s, job.study_id),
                    "deliver",
                    f"delivery lease to {delivery.destination} expired (owner {owner}); released",
                    level=logging.WARNING,
                )
        return expired_ids

    # -- dispatch ---------------------------------------------------------------------------

    def claim_delivery(self, owner: str, lease_s: float) -> ClaimedDelivery | None:
        """Atomically claim the oldest due PENDING delivery without a live lease.

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
        NodeError
            If the database write fails.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        with self._write("claim_delivery") as tx:
            s, now = tx.session, tx.now
            delivery = s.scalars(
                select(Delivery)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.next_attempt_at <= now,
                    or_(Delivery.lease_token.is_(None), Delivery.lease_expires_at < now),
                )
                .order_by(Delivery.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).one_or_none()
            if delivery is None:
                return None
            job = s.get_one(Job, delivery.job_id)
            if job.seg_path is None:  # pragma: no cover - complete_inference prevents it
                raise NodeError(f"delivery {delivery.id}: job {job.id} has no SEG")
            token = secrets.token_hex(16)
            delivery.owner = owner
            delivery.lease_token = token
            delivery.lease_expires_at = now + timedelta(seconds=lease_s)
            delivery.attempts += 1
            if delivery.first_attempt_at is None:
                delivery.first_attempt_at = now
            delivery.last_attempt_at = now
            study_uid = self._study_uid(s, job.study_id)
            self._event(
                tx,
                job,
                study_uid,
                "deliver",
                f"delivery to {delivery.destination} claimed by {owner} "
                f"(attempt {delivery.attempts})",
                data={"destination": delivery.destination, "attempt": delivery.attempts},
                level=logging.DEBUG,
            )
            return ClaimedDelivery(
                id=delivery.id,
                job_id=job.id,
                token=token,
                destination=delivery.destination,
                ae_title=delivery.ae_title,
                host=delivery.host,
                port=delivery.port,
                seg_path=job.seg_path,
                seg_sop_instance_uid=job.seg_sop_instance_uid,
                study_instance_uid=study_uid,
                attempts=delivery.attempts,
                url=delivery.url,
            )

    def delivery_succeeded(self, delivery_id: int, token: str) -> None:
        """Mark a delivery DONE; the job is DONE once every delivery is.

        Parameters
        ----------
        delivery_id : int
            The claimed delivery.
        token : str
            The token from :meth:`claim_delivery`.

        Raises
        ------
        JobLeaseLostError
            If the delivery is no longer PENDING under this token.
        NodeError
            If the database write fails.
        """
        with self._write("delivery_succeeded") as tx:
            s, now = tx.session, tx.now
            delivery = self._lock_delivery(s, delivery_id, token, "delivery_succeeded")
            delivery.state = DeliveryState.DONE
            delivery.delivered_at = now
            self._clear_lease(delivery)
            job = self._lock_job(s, delivery.job_id)
            assert job is not None  # foreign key
            study_uid = self._study_uid(s, job.study_id)
            sent_s = (
                _seconds(now - delivery.last_attempt_at)
                if delivery.last_attempt_at is not None
                else None
            )
            self._event(
                tx,
                job,
                study_uid,
                "deliver",
                f"delivered to {delivery.destination} (attempt {delivery.attempts})",
                duration_s=sent_s,
                data={"destination": delivery.destination, "attempt": delivery.attempts},
            )
            states = s.scalars(select(Delivery.state).where(Delivery.job_id == job.id)).all()
            if job.state == JobState.DELIVERING and all(st == DeliveryState.DONE for st in states):
                job.state = JobState.DONE
                job.finished_at = now
                total = self._total_s(job, now)
                durations = {"total": total}
                if job.delivering_at is not None:
                    durations["delivery"] = _seconds(now - job.delivering_at)
                self._add_durations(job, **durations)
                self._event(
                    tx,
                    job,
                    study_uid,
                    "done",
                    f"job done: SEG delivered to {len(states)} destination(s)",
                    duration_s=total,
                    data={"outcome": job.outcome},
                )

    def delivery_failed(
        self, delivery_id: int, token: str, error: str, status: int | None = None
    ) -> DeliveryState:
        """Record a failed delivery attempt; retry with backoff or give up.

        Deliveries have no attempt cap: they retry until ``give_up_after_s`` has passed since
        their first attempt, then the delivery and its job become FAILED.

        Parameters
        ----------
        delivery_id : int
            The claimed delivery.
        token : str
            The token from :meth:`claim_delivery`.
        error : str
            Why it failed (no patient data).
        status : int or None
            The DIMSE status the destination returned, if any.

        Returns
        -------
        DeliveryState
            PENDING (due after ``backoff_s(attempts)``) or FAILED.

        Raises
        ------
        JobLeaseLostError
            If the delivery is no longer PENDING under this token.
        NodeError
            If the database write fails.
        """
        with self._write("delivery_failed") as tx:
            s, now = tx.session, tx.now
            delivery = self._lock_delivery(s, delivery_id, token, "delivery_failed")
            delivery.last_error = error
            delivery.last_status = status
            self._clear_lease(delivery)
            job = self._lock_job(s, delivery.job_id)
            assert job is not None  # foreign key
            study_uid = self._study_uid(s, job.study_id)
            first = delivery.first_attempt_at or now
            status_txt = f" (status 0x{status:04X})" if status is not None else ""
            data = {
                "destination": delivery.destination,
                "attempt": delivery.attempts,
                "status": status,
            }
            if _seconds(now - first) >= self._retry.give_up_after_s:
                delivery.state = DeliveryState.FAILED
                reason = (
                    f"delivery to {delivery.destination} gave up after {delivery.attempts} "
                    f"attempts: {error}{status_txt}"
                )
                if job.state not in TERMINAL_STATES:
                    job.state = JobState.FAILED
                    job.finished_at = now
                    job.error = reason
                self._event(tx, job, study_uid, "deliver", reason, data=data, level=logging.ERROR)
            else:
                wait = self._retry.backoff_s(delivery.attempts)
                delivery.next_attempt_at = now + timedelta(seconds=wait)
                self._event(
                    tx,
                    job,
                    study_uid,
                    "deliver",
                    f"delivery to {delivery.destination} failed (attempt {delivery.attempts}), "
                    f"retry in {wait:g}s: {error}{status_txt}",
                    data=data,
                    level=logging.WARNING,
                )
            return delivery.state

    # -- admin ------------------------------------------------------------------------------

    def retry_job(self, job_id: int) -> None:
        """Retry a finished job (admin).

        A FAILED or CANCELLED job that has a SEG and failed deliveries gets those deliveries
        PENDING again (attempts and first attempt reset) and becomes DELIVERING; any other
        finished job is QUEUED again with attempts reset. The old error stays in the event.

        Parameters
        ----------
        job_id : int
            The job.

        Raises
        ------
        NodeError
            If the job does not exist or is not in a terminal state.
        """
        with self._write("retry_job") as tx:
            s, now = tx.session, tx.now
            job = self._lock_job(s, job_id)
            if job is None:
                raise NodeError(f"job {job_id} does not exist")
            if job.state not in TERMINAL_STATES:
                raise NodeError(
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
            self._clear_lease(job)
            if redeliver:
                for delivery in failed:
                    delivery.state = DeliveryState.PENDING
                    delivery.attempts = 0
                    delivery.first_attempt_at = None
                    delivery.next_attempt_at = now
                    delivery.last_error = None
                    delivery.last_status = None
                    self._clear_lease(delivery)
                job.state = JobState.DELIVERING
                job.delivering_at = now
                what = "redelivering to " + ", ".join(d.destination for d in failed)
            else:
                job.state = JobState.QUEUED
                job.attempts = 0
                job.not_before = now
                what = "queued again"
            self._event(
                tx,
                job,
                self._study_uid(s, job.study_id),
                "retry",
                f"admin retry of {previous} job: {what}"
                + (f" (previous error: {old_error})" if old_error else ""),
                data={"previous_state": previous, "previous_error": old_error},
            )

    def cancel_job(self, job_id: int) -> None:
        """Cancel a job that has not finished (admin).

        Pending deliveries become FAILED with error ``"cancelled"``; a worker or dispatcher
        still holding a lease gets :class:`~scp_node.errors.JobLeaseLostError` on its next call.

        Parameters
        ----------
        job_id : int
            The job.

        Raises
        ------
        NodeError
            If the job does not exist or has already finished.
        """
        with self._write("cancel_job") as tx:
            s, now = tx.session, tx.now
            job = self._lock_job(s, job_id)
            if job is None:
                raise NodeError(f"job {job_id} does not exist")
            if job.state in TERMINAL_STATES:
                raise NodeError(f"job {job_id} is already {job.state.value}; nothing to cancel")
            previous = job.state.value
            job.state = JobState.CANCELLED
            job.finished_at = now
            self._clear_lease(job)
            pending = s.scalars(
                select(Delivery).where(
                    Delivery.job_id == job.id, Delivery.state == DeliveryState.PENDING
                )
            ).all()
            for delivery in pending:
                delivery.state = DeliveryState.FAILED
                delivery.last_error = "cancelled"
                self._clear_lease(delivery)
            self._event(
                tx,
                job,
                self._study_uid(s, job.study_id),
                "cancel",
                f"job cancelled (was {previous})",
                data={"previous_state": previous, "deliveries_cancelled": len(pending)},
            )

    # -- views ------------------------------------------------------------------------------

    def list_jobs(
        self, state: JobState | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobView]:
        """List jobs, newest first.

        Parameters
        ----------
        state : JobState or None
            Only jobs in this state; all if None.
        limit : int
            At most this many.
        offset : int
            Skip this many (paging).

        Returns
        -------
        list[JobView]

        Raises
        ------
        NodeError
            If the database read fails.
        """
        with self._read("list_jobs") as s:
            stmt = (
                select(Job, Study.study_instance_uid, Study.study_date)
                .join(Study, Study.id == Job.study_id)
                .order_by(Job.id.desc())
                .limit(limit)
                .offset(offset)
            )
            if state is not None:
                stmt = stmt.where(Job.state == state)
            rows = s.execute(stmt).all()
            return self._job_views(s, [(row[0], row[1], row[2]) for row in rows])

    def get_job(self, job_id: int) -> JobView | None:
        """Return one job, or None if it does not exist.

        Parameters
        ----------
        job_id : int
            The job.

        Returns
        -------
        JobView or None

        Raises
        ------
        NodeError
            If the database read fails.
        """
        with self._read("get_job") as s:
            row = s.execute(
                select(Job, Study.study_instance_uid, Study.study_date)
                .join(Study, Study.id == Job.study_id)
                .where(Job.id == job_id)
            ).first()
            if row is None:
                return None
            return self._job_views(s, [(row[0], row[1], row[2])])[0]

    @staticmethod
    def _job_views(session: Session, rows: list[tuple[Job, str, str | None]]) -> list[JobView]:
        by_job: dict[int, list[DeliveryView]] = {}
        if rows:
            deliveries = session.scalars(
                select(Delivery)
                .where(Delivery.job_id.in_([job.id for job, _, _ in rows]))
                .order_by(Delivery.id)
            ).all()
            for d in deliveries:
                by_job.setdefault(d.job_id, []).append(
                    DeliveryView(
                        destination=d.destination,
                        ae_title=d.ae_title,
                        host=d.host,
                        port=d.port,
                        state=d.state,
                        attempts=d.attempts,
                        last_error=d.last_error,
                        last_status=d.last_status,
                        delivered_at=d.delivered_at,
                        url=d.url,
                    )
                )
        return [
            JobView(
                id=job.id,
                state=job.state,
                study_instance_uid=study_uid,
                study_date=study_date,
                model=job.model,
                attempts=job.attempts,
                max_attempts=job.max_attempts,
                error=job.error,
                outcome=job.outcome,
                series_instance_uid=job.series_instance_uid,
                seg_sop_instance_uid=job.seg_sop_instance_uid,
                seg_path=job.seg_path,
                created_at=job.created_at,
                claimed_at=job.claimed_at,
                finished_at=job.finished_at,
                durations={k: float(v) for k, v in (job.durations or {}).items()},
                deliveries=tuple(by_job.get(job.id, ())),
            )
            for job, study_uid, study_date in rows
        ]

    def events_after(
        self, after_id: int, job_id: int | None = None, limit: int = 500
    ) -> list[JobEventView]:
        """Return events with an id above ``after_id``, oldest first (for ``logs -f``).

        Parameters
        ----------
        after_id : int
            The last id already seen; 0 for everything.
        job_id : int or None
            Only this job's events.
        limit : int
            At most this many.

        Returns
        -------
        list[JobEventView]

        Raises
        ------
        NodeError
            If the database read fails.
        """
        with self._read("events_after") as s:
            stmt = (
                select(JobEvent, Study.study_instance_uid)
                .join(Job, Job.id == JobEvent.job_id)
                .join(Study, Study.id == Job.study_id)
                .where(JobEvent.id > after_id)
                .order_by(JobEvent.id)
                .limit(limit)
            )
            if job_id is not None:
                stmt = stmt.where(JobEvent.job_id == job_id)
            return [
                JobEventView(
                    id=ev.id,
                    job_id=ev.job_id,
                    at=ev.at,
                    stage=ev.stage,
                    state=ev.state,
                    message=ev.message,
                    duration_s=ev.duration_s,
                    study_instance_uid=study_uid,
                    data=dict(ev.data or {}),
                )
                for ev, study_uid in s.execute(stmt).all()
            ]

    def counts_by_state(self) -> dict[str, int]:
        """Count jobs per state.

        Returns
        -------
        dict[str, int]
            Every :class:`JobState` value, zero included.

        Raises
        ------
        NodeError
            If the database read fails.
        """
        counts = {state.value: 0 for state in JobState}
        with self._read("counts_by_state") as s:
            for state, count in s.execute(
                select(Job.state, func.count(Job.id)).group_by(Job.state)
            ).all():
                counts[JobState(state).value] = int(count)
        return counts
