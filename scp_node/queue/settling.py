"""Settling: the settle stage's reads and writes (quiet studies -> queued jobs) and the
requeue of leases whose holder stopped heartbeating."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.orm import Session

from scp_node.queue import tx as q
from scp_node.queue.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Level,
    Outcome,
    Series,
    Stage,
    Study,
)
from scp_node.queue.records import SeriesFacts, UnsettledStudy
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.tx import Clock, Sessions, Tx, utcnow

__all__ = ["Router", "Settling"]

#: A study with instances no settle has covered yet (never settled, or received since).
_UNSETTLED = or_(
    Study.settled_through.is_(None),
    Study.last_received_at > Study.settled_through,
)

#: A model's routing rule: None when a study's series may suit the model, else why not.
Router = Callable[[Sequence[SeriesFacts]], "str | None"]


class Settling:
    """Turns studies into jobs and takes back expired leases.

    Parameters
    ----------
    engine : Engine
        The migrated job table.
    retry_policy : RetryPolicy
        Gives each new job its ``max_attempts``.
    clock : Callable[[], datetime]
        Timezone-aware current time (injected by tests).
    """

    def __init__(self, engine: Engine, retry_policy: RetryPolicy, clock: Clock = utcnow) -> None:
        self._tx = Sessions(engine, clock)
        self._retry = retry_policy

    def settle(
        self,
        quiet_s: float,
        models: Sequence[str] | Mapping[str, Router | None],
        *,
        only: Collection[str] | None = None,
        exclude: Collection[str] = (),
        per_series: Collection[str] = (),
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
        models : Sequence[str] or Mapping of str to (Router or None)
            Model names; one job per model whose router takes the study (a model without a
            router takes every study). A study a router rules out gets a job that is DONE at
            once with outcome ``no_matching_series`` and the router's reason as its error
            and in its event: no inference runs, and the CLI and dashboard show why.
        only : Collection[str] or None
            Settle only these studies (Study Instance UIDs); None means any.
        exclude : Collection[str]
            Never settle these studies now (e.g. known to be incomplete).
        per_series : Collection[str]
            Models among ``models`` that work per series: instead of one study job, one
            job per series their router takes, for each series no job covers yet (see
            :meth:`settle_series`).

        Returns
        -------
        list[int]
            Ids of the jobs created, in creation order.

        Raises
        ------
        ValueError
            If ``quiet_s`` is negative.
        QueueError
            If the database write fails.
        """
        if quiet_s < 0:
            raise ValueError(f"quiet_s must be >= 0, got {quiet_s}")
        routers: Mapping[str, Router | None] = (
            models if isinstance(models, Mapping) else dict.fromkeys(models)
        )
        created: list[int] = []
        with self._tx.write("settle") as tx:
            s, now = tx.session, tx.now
            cutoff = now - timedelta(seconds=quiet_s)
            studies = s.scalars(
                select(Study)
                .where(
                    Study.last_received_at <= cutoff,
                    _UNSETTLED,
                )
                .order_by(Study.id)
                .with_for_update(skip_locked=True)
            ).all()
            for study in studies:
                uid = study.study_instance_uid
                if (only is not None and uid not in only) or uid in exclude:
                    continue
                settle_wait = q.seconds(now - study.last_received_at)
                receive = q.seconds(study.last_received_at - study.first_received_at)
                facts: list[SeriesFacts] | None = None
                for model, router in routers.items():
                    if model in per_series:
                        jobs, why_not = self._series_jobs(tx, study, model, router, None)
                        created += jobs
                        if why_not is not None:
                            created.append(
                                self._not_routed(tx, study, model, why_not, receive, settle_wait)
                            )
                        continue
                    why_not = None
                    if router is not None:
                        if facts is None:
                            facts = _series_facts(s, study.id)
                        why_not = router(facts)
                    if why_not is not None:
                        created.append(
                            self._not_routed(tx, study, model, why_not, receive, settle_wait)
                        )
                        continue
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
                    job = self._queued_job(
                        tx, study, model, {"receive": receive, "settle_wait": settle_wait}
                    )
                    tx.event(
                        job,
                        uid,
                        Stage.SETTLED,
                        f"study settled: {study.instance_count} instances, job queued for "
                        f"model {model}",
                        duration_s=settle_wait,
                        data={"instance_count": study.instance_count, "receive_s": receive},
                    )
                    created.append(job.id)
                study.settled_through = study.last_received_at
        return created

    def settle_series(
        self,
        series_quiet_s: float,
        models: Mapping[str, Router | None],
        *,
        complete: Collection[str] = (),
        by_quiet: bool = True,
    ) -> list[int]:
        """Queue the jobs of per-series ``models`` for series quiet for ``series_quiet_s``,
        while their study may still be arriving.

        A series is quiet when its last instance arrived at least ``series_quiet_s`` ago. It
        gets one QUEUED job per model whose router takes it alone, unless a job of that model
        for that series was created after its last instance (or is still QUEUED: it will see
        every instance). A series that a router rules out gets no job here; the study's own
        settle records why.

        Parameters
        ----------
        series_quiet_s : float
            Seconds without a new instance in a series before it becomes jobs (>= 0).
        models : Mapping of str to (Router or None)
            The per-series models and their routers.
        complete : Collection of str
            Series UIDs known to have every instance here (the sending PACS's count): they
            settle whether quiet or not.
        by_quiet : bool
            If False, only ``complete`` series settle (the settler's start-up wait).

        Returns
        -------
        list[int]
            Ids of the jobs created.

        Raises
        ------
        ValueError
            If ``series_quiet_s`` is negative.
        QueueError
            If the database write fails.
        """
        if series_quiet_s < 0:
            raise ValueError(f"series_quiet_s must be >= 0, got {series_quiet_s}")
        if not models:
            return []
        created: list[int] = []
        with self._tx.write("settle_series") as tx:
            s, now = tx.session, tx.now
            cutoff = now - timedelta(seconds=series_quiet_s)
            studies = s.scalars(
                select(Study).where(_UNSETTLED).order_by(Study.id).with_for_update(skip_locked=True)
            ).all()
            for study in studies:
                for model, router in models.items():
                    jobs, _why_not = self._series_jobs(
                        tx, study, model, router, cutoff, complete=complete, by_quiet=by_quiet
                    )
                    created += jobs
        return created

    def _queued_job(
        self,
        tx: Tx,
        study: Study,
        model: str,
        durations: dict[str, float],
        *,
        series_instance_uid: str | None = None,
    ) -> Job:
        """A new QUEUED job of ``model`` for ``study`` (or one of its series), flushed."""
        job = Job(
            study_id=study.id,
            model=model,
            state=JobState.QUEUED,
            attempts=0,
            max_attempts=self._retry.max_attempts,
            not_before=tx.now,
            created_at=tx.now,
            series_instance_uid=series_instance_uid,
            durations=durations,
        )
        tx.session.add(job)
        tx.session.flush()
        return job

    def _series_jobs(
        self,
        tx: Tx,
        study: Study,
        model: str,
        router: Router | None,
        cutoff: datetime | None,
        *,
        complete: Collection[str] = (),
        by_quiet: bool = True,
    ) -> tuple[list[int], str | None]:
        """Jobs of a per-series ``model`` for the series of ``study`` quiet since ``cutoff``
        (None: every series) or in ``complete``, that no job covers yet; and, when the model
        takes no series of the study at all and none has a job, the router's reason."""
        s, now = tx.session, tx.now
        last = dict(
            s.execute(
                select(Series.series_instance_uid, func.max(Instance.received_at))
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id == study.id)
                .group_by(Series.series_instance_uid)
            ).all()
        )
        jobs = s.execute(
            select(Job.series_instance_uid, Job.state, Job.created_at).where(
                Job.study_id == study.id, Job.model == model, Job.series_instance_uid.is_not(None)
            )
        ).all()
        facts = {f.series_instance_uid: f for f in _series_facts(s, study.id)}
        created: list[int] = []
        covered = 0
        for uid, last_at in last.items():
            if any(
                j_uid == uid and (state == JobState.QUEUED or at >= last_at)
                for j_uid, state, at in jobs
            ):
                covered += 1
                continue
            known_complete = uid in complete
            if not known_complete and (not by_quiet or (cutoff is not None and last_at > cutoff)):
                continue  # still arriving
            if router is not None and router([facts[uid]]) is not None:
                continue
            durations = {
                "receive": q.seconds(last_at - study.first_received_at),
                "settle_wait": q.seconds(now - last_at),
            }
            job = self._queued_job(tx, study, model, durations, series_instance_uid=uid)
            count = s.execute(
                select(Series.instance_count).where(Series.series_instance_uid == uid)
            ).scalar_one()
            tx.event(
                job,
                study.study_instance_uid,
                Stage.SETTLED,
                f"series settled: {count} instances"
                + (" (all the PACS holds)" if known_complete else "")
                + f", job queued for model {model} (per series)",
                duration_s=q.seconds(now - last_at),
                data={
                    "instance_count": count,
                    "series_instance_uid": uid,
                    "complete_by_query": known_complete,
                },
            )
            created.append(job.id)
        why_not = None
        if not created and not covered and router is not None:
            why_not = router(list(facts.values()))
        return created, why_not

    def _not_routed(
        self, tx: Tx, study: Study, model: str, reason: str, receive: float, settle_wait: float
    ) -> int:
        """A finished job that records why ``model`` does not take ``study``."""
        now: datetime = tx.now
        job = Job(
            study_id=study.id,
            model=model,
            state=JobState.DONE,
            attempts=0,
            max_attempts=self._retry.max_attempts,
            not_before=now,
            created_at=now,
            finished_at=now,
            outcome=Outcome.NO_MATCHING_SERIES,
            error=reason,
            durations={"receive": receive, "settle_wait": settle_wait},
        )
        tx.session.add(job)
        tx.session.flush()
        tx.event(
            job,
            study.study_instance_uid,
            Stage.SETTLED,
            f"study settled: not routed to model {model}: {reason}",
            duration_s=settle_wait,
            data={"routed": False, "reason": reason, "instance_count": study.instance_count},
        )
        return job.id

    def series_facts(self, study_instance_uid: str) -> list[SeriesFacts]:
        """What intake recorded about each series of a study (empty if unknown).

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("series_facts") as s:
            study_id = s.scalars(
                select(Study.id).where(Study.study_instance_uid == study_instance_uid)
            ).one_or_none()
            return [] if study_id is None else _series_facts(s, study_id)

    def unsettled_studies(self) -> list[UnsettledStudy]:
        """Studies whose latest instances no job covers yet, oldest first.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("unsettled_studies") as s:
            studies = s.scalars(select(Study).where(_UNSETTLED).order_by(Study.id)).all()
            ids = [study.id for study in studies]
            counts: dict[int, dict[str, int]] = {}
            for study_id, series_uid, count in s.execute(
                select(Series.study_id, Series.series_instance_uid, Series.instance_count).where(
                    Series.study_id.in_(ids)
                )
            ).all():
                counts.setdefault(study_id, {})[series_uid] = count
            aes: dict[int, set[str]] = {}
            for study_id, ae in s.execute(
                select(Series.study_id, Instance.calling_ae)
                .join(Series, Instance.series_id == Series.id)
                .where(Series.study_id.in_(ids))
                .distinct()
            ).all():
                aes.setdefault(study_id, set()).add(ae)
            return [
                UnsettledStudy(
                    study_instance_uid=study.study_instance_uid,
                    last_received_at=study.last_received_at,
                    instance_count=study.instance_count,
                    calling_aes=frozenset(aes.get(study.id, ())),
                    series_counts=counts.get(study.id, {}),
                )
                for study in studies
            ]

    def series_last_received(self) -> list[datetime]:
        """When each series of the unsettled studies received its latest instance.

        With ``series_quiet_s`` added, the moments per-series jobs may become due.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("series_last_received") as s:
            return list(
                s.scalars(
                    select(func.max(Instance.received_at))
                    .join(Series, Instance.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id)
                    .where(_UNSETTLED)
                    .group_by(Series.id)
                ).all()
            )

    def requeue_expired(self) -> list[int]:
        """Requeue RUNNING jobs whose lease expired and release expired delivery leases.

        A job with no attempts left becomes FAILED with error ``"lease expired ..."``.

        Returns
        -------
        list[int]
            Ids of the jobs whose inference lease had expired (requeued or failed).

        Raises
        ------
        QueueError
            If the database write fails.
        """
        expired_ids: list[int] = []
        with self._tx.write("requeue_expired") as tx:
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
                    f"{job.max_attempts}, last heartbeat {q.iso(job.heartbeat_at)})"
                )
                q.clear_lease(job)
                job.error = error
                if job.attempts >= job.max_attempts:
                    job.state = JobState.FAILED
                    job.finished_at = now
                    message, level = f"job failed: {error}", Level.ERROR
                else:
                    job.state = JobState.QUEUED
                    job.not_before = now
                    message, level = f"job requeued: {error}", Level.WARNING
                tx.event(job, q.study_uid(s, job.study_id), Stage.REQUEUE, message, level=level)
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
                q.clear_lease(delivery)
                job = s.get_one(Job, delivery.job_id)
                tx.event(
                    job,
                    q.study_uid(s, job.study_id),
                    Stage.DELIVER,
                    f"delivery lease to {delivery.destination} expired (owner {owner}); released",
                    level=Level.WARNING,
                )
        return expired_ids


def _series_facts(s: Session, study_id: int) -> list[SeriesFacts]:
    rows = s.scalars(select(Series).where(Series.study_id == study_id).order_by(Series.id)).all()
    return [
        SeriesFacts(
            series_instance_uid=row.series_instance_uid,
            modality=row.modality,
            series_description=row.series_description,
            body_part_examined=row.body_part_examined,
            slice_thickness_mm=row.slice_thickness_mm,
            orientation=_cosines(row.orientation),
            frame_count=row.frame_count,
        )
        for row in rows
    ]


def _cosines(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
