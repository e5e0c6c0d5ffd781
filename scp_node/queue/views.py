"""JobViews: every read the CLI, the dashboard, ``/healthz`` and ``/metrics`` make."""

from __future__ import annotations

import builtins
from collections.abc import Collection

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from scp_node.errors import JobNotFoundError
from scp_node.queue.models import Delivery, Job, JobEvent, JobState, Series, Study
from scp_node.queue.records import (
    DeliveryView,
    JobEventView,
    JobView,
    SegVersion,
    SeriesInfo,
    WorkerLease,
)
from scp_node.queue.tx import Sessions

__all__ = ["JobViews"]

#: At most this many running jobs are listed by :meth:`JobViews.running_leases`.
_MAX_LEASES = 100


class JobViews:
    """Read-only views of the job table; no call waits for a writer.

    Parameters
    ----------
    engine : Engine
        The migrated job table.
    """

    def __init__(self, engine: Engine) -> None:
        self._tx = Sessions(engine)

    def list(
        self, state: JobState | None = None, limit: int = 50, offset: int = 0
    ) -> builtins.list[JobView]:
        """List jobs, newest first.

        Parameters
        ----------
        state : JobState or None
            Only jobs in this state; all if None.
        limit : int
            At most this many.
        offset : int
            Skip this many (paging).

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("list_jobs") as s:
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
            return _job_views(s, [(row[0], row[1], row[2]) for row in rows])

    def get(self, job_id: int) -> JobView:
        """Return one job.

        Raises
        ------
        JobNotFoundError
            If no job has this id.
        QueueError
            If the database read fails.
        """
        with self._tx.read("get_job") as s:
            row = s.execute(
                select(Job, Study.study_instance_uid, Study.study_date)
                .join(Study, Study.id == Job.study_id)
                .where(Job.id == job_id)
            ).first()
            if row is None:
                raise JobNotFoundError(f"job {job_id} does not exist")
            return _job_views(s, [(row[0], row[1], row[2])])[0]

    def events_after(
        self, after_id: int, job_id: int | None = None, limit: int = 500
    ) -> builtins.list[JobEventView]:
        """Return events with an id above ``after_id``, oldest first (for ``logs -f``).

        Parameters
        ----------
        after_id : int
            The last id already seen; 0 for everything.
        job_id : int or None
            Only this job's events.
        limit : int
            At most this many.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("events_after") as s:
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
                    level=ev.level,
                )
                for ev, study_uid in s.execute(stmt).all()
            ]

    def counts(self) -> dict[str, int]:
        """Count jobs per state: every :class:`JobState` value, zero included.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        counts = {state.value: 0 for state in JobState}
        with self._tx.read("counts") as s:
            for state, count in s.execute(
                select(Job.state, func.count(Job.id)).group_by(Job.state)
            ).all():
                counts[JobState(state).value] = int(count)
        return counts

    def series_info(
        self, study_instance_uids: Collection[str]
    ) -> dict[str, builtins.list[SeriesInfo]]:
        """Describe every series of the given studies, in one query (a page of jobs).

        Returns
        -------
        dict[str, list[SeriesInfo]]
            Study Instance UID -> its series in the order first received; a study that is
            not known maps to an empty list.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        found: dict[str, builtins.list[SeriesInfo]] = {uid: [] for uid in study_instance_uids}
        if not found:
            return found
        with self._tx.read("series_info") as s:
            rows = s.execute(
                select(Study.study_instance_uid, Series)
                .join(Study, Study.id == Series.study_id)
                .where(Study.study_instance_uid.in_(list(found)))
                .order_by(Series.id)
            ).all()
            for uid, r in rows:
                found[uid].append(
                    SeriesInfo(
                        series_instance_uid=r.series_instance_uid,
                        modality=r.modality,
                        instance_count=r.instance_count,
                        series_description=r.series_description,
                        series_number=r.series_number,
                    )
                )
        return found

    def running_leases(self) -> builtins.list[WorkerLease]:
        """Running jobs (oldest first, at most 100): who holds each and its latest event.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("running_leases") as s:
            rows = s.execute(
                select(Job.id, Job.owner, Job.claimed_at, Job.created_at, func.max(JobEvent.at))
                .outerjoin(JobEvent, JobEvent.job_id == Job.id)
                .where(Job.state == JobState.RUNNING)
                .group_by(Job.id, Job.owner, Job.claimed_at, Job.created_at)
                .order_by(Job.id)
                .limit(_MAX_LEASES)
            ).all()
        return [
            WorkerLease(
                job_id=job_id,
                owner=owner or "?",
                claimed_at=claimed_at or created_at,
                last_event_at=last_at or created_at,
            )
            for job_id, owner, claimed_at, created_at, last_at in rows
        ]


def _job_views(
    session: Session, rows: builtins.list[tuple[Job, str, str | None]]
) -> builtins.list[JobView]:
    by_job: dict[int, builtins.list[DeliveryView]] = {}
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
                    kind=d.kind,
                    sop_instance_uid=d.sop_instance_uid,
                )
            )
    neighbours = _neighbours(session, [job for job, _, _ in rows])
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
            seg_series_instance_uid=job.seg_series_instance_uid,
            seg_instance_number=job.seg_instance_number,
            supersedes=neighbours.get(job.id, (None, None))[0],
            superseded_by=neighbours.get(job.id, (None, None))[1],
            measurements=tuple(job.measurements or ()),
        )
        for job, study_uid, study_date in rows
    ]


def _neighbours(
    session: Session, jobs: builtins.list[Job]
) -> dict[int, tuple[SegVersion | None, SegVersion | None]]:
    """Job id -> (the SEG it superseded, the SEG that superseded it): the versions of its
    SEG series just below and just above its InstanceNumber."""
    series = {job.seg_series_instance_uid for job in jobs if job.seg_series_instance_uid}
    if not series:
        return {}
    rows = session.execute(
        select(
            Job.id, Job.seg_series_instance_uid, Job.seg_sop_instance_uid, Job.seg_instance_number
        ).where(
            Job.seg_series_instance_uid.in_(series),
            Job.seg_sop_instance_uid.is_not(None),
            Job.seg_instance_number.is_not(None),
        )
    ).all()
    by_series: dict[str, builtins.list[SegVersion]] = {}
    for job_id, series_uid, sop_uid, number in rows:
        by_series.setdefault(str(series_uid), []).append(
            SegVersion(job_id=job_id, sop_instance_uid=str(sop_uid), instance_number=number or 0)
        )
    result: dict[int, tuple[SegVersion | None, SegVersion | None]] = {}
    for job in jobs:
        if job.seg_series_instance_uid is None or job.seg_instance_number is None:
            continue
        mine = job.seg_instance_number
        others = by_series.get(job.seg_series_instance_uid, [])
        before = [v for v in others if v.instance_number < mine]
        after = [v for v in others if v.instance_number > mine]
        result[job.id] = (
            max(before, key=lambda v: (v.instance_number, v.job_id), default=None),
            min(after, key=lambda v: (v.instance_number, v.job_id), default=None),
        )
    return result
