"""WorkQueue: the worker's side of the job table (claim, heartbeat, stages, finish) and the
reads it needs (a study's instance files by series; the series still arriving)."""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, or_, select

from scp_node.queue import tx as q
from scp_node.queue import versions
from scp_node.queue.models import (
    Delivery,
    DeliveryKind,
    Instance,
    Job,
    JobState,
    Level,
    Outcome,
    Series,
    Stage,
    Study,
)
from scp_node.queue.records import (
    ClaimedJob,
    DeliveryTarget,
    OutputObject,
    SegVersion,
    Supersession,
)
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.tx import Clock, Sessions, utcnow

__all__ = ["IncomingInstance", "WorkQueue"]


class WorkQueue:
    """Jobs for workers: each claimed under a lease that finishing calls must still hold.

    Parameters
    ----------
    engine : Engine
        The migrated job table.
    retry_policy : RetryPolicy
        Backoff between failed attempts.
    clock : Callable[[], datetime]
        Timezone-aware current time (injected by tests).
    """

    def __init__(self, engine: Engine, retry_policy: RetryPolicy, clock: Clock = utcnow) -> None:
        self._tx = Sessions(engine, clock)
        self._retry = retry_policy

    def claim(
        self, owner: str, lease_s: float, models: Collection[str] | None = None
    ) -> ClaimedJob | None:
        """Atomically claim the oldest QUEUED job that is due (for one of ``models``).

        Parameters
        ----------
        owner : str
            Who claims (e.g. ``host:pid:work``); kept on the job and in its events.
        lease_s : float
            Seconds the lease lasts unless renewed by :meth:`heartbeat` (> 0).
        models : Collection of str or None
            Claim only jobs of these models (the ones this worker serves); None means any.
            An empty collection claims nothing.

        Returns
        -------
        ClaimedJob or None
            None if no job is due.

        Raises
        ------
        ValueError
            If ``lease_s`` is not positive.
        QueueError
            If the database write fails.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        if models is not None and not models:
            return None
        with self._tx.write("claim") as tx:
            s, now = tx.session, tx.now
            due = select(Job).where(Job.state == JobState.QUEUED, Job.not_before <= now)
            if models is not None:
                due = due.where(Job.model.in_(sorted(models)))
            job = s.scalars(
                due.order_by(Job.id).limit(1).with_for_update(skip_locked=True)
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
                queue_wait = q.seconds(now - job.created_at)
                q.add_durations(job, queue_wait=queue_wait)
            study_uid = q.study_uid(s, job.study_id)
            tx.event(
                job,
                study_uid,
                Stage.CLAIM,
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
                series_instance_uid=job.series_instance_uid,
            )

    def heartbeat(self, job_id: int, token: str, lease_s: float) -> None:
        """Extend a job's lease to ``lease_s`` seconds from now.

        Raises
        ------
        ValueError
            If ``lease_s`` is not positive.
        JobLeaseLostError
            If the job is no longer RUNNING under this token (requeued, cancelled, reclaimed).
        QueueError
            If the database write fails.
        """
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        with self._tx.write("heartbeat") as tx:
            job = q.leased_job(tx.session, job_id, token, "heartbeat")
            job.lease_expires_at = tx.now + timedelta(seconds=lease_s)
            job.heartbeat_at = tx.now

    def record_stage(
        self,
        job_id: int,
        token: str,
        stage: Stage,
        duration_s: float,
        message: str = "",
        data: dict[str, Any] | None = None,
        level: Level = Level.INFO,
    ) -> None:
        """Record that a stage of a claimed job finished and how long it took.

        Parameters
        ----------
        job_id, token : int, str
            The claimed job and the token from :meth:`claim`.
        stage : Stage
            ``SELECT``, ``LOAD``, ``INFERENCE`` or ``SEG``; its value keys ``durations``.
        duration_s : float
            Seconds the stage took.
        message : str
            Free text for the event (UIDs and numbers only, never patient data).
        data : dict or None
            JSON-serialisable details.
        level : Level
            ``WARNING`` when the stage finished but found something worth an admin's eye
            (e.g. an irregular series segmented anyway).

        Raises
        ------
        JobLeaseLostError
            If the job is no longer RUNNING under this token.
        QueueError
            If the database write fails.
        """
        with self._tx.write("record_stage") as tx:
            job = q.leased_job(tx.session, job_id, token, f"record_stage {stage.value}")
            q.add_durations(job, **{stage.value: duration_s})
            tx.event(
                job,
                q.study_uid(tx.session, job.study_id),
                stage,
                message or f"{stage.value} done",
                level=level,
                duration_s=duration_s,
                data=data,
            )

    def seg_history(self, seg_series_instance_uid: str) -> list[SegVersion]:
        """The SEGs jobs made in a SEG series, oldest InstanceNumber first.

        Each :class:`SegVersion` says which destinations hold it (delivery DONE) or are
        being sent it now (live lease); a pending delivery waiting for its next attempt
        does not count: :meth:`complete` drops it once a newer SEG exists.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        now = self._tx.now()
        with self._tx.read("seg_history") as s:
            return versions.seg_versions(s, seg_series_instance_uid, now)

    def complete(
        self,
        job_id: int,
        token: str,
        *,
        series_instance_uid: str | None,
        seg_path: str | None,
        seg_sop_instance_uid: str | None,
        outcome: Outcome,
        destinations: Sequence[DeliveryTarget],
        seg_series_instance_uid: str | None = None,
        seg_instance_number: int | None = None,
        supersedes: Supersession | None = None,
        objects: Mapping[str, Sequence[OutputObject]] | None = None,
        measurements: Sequence[dict[str, Any]] | None = None,
    ) -> JobState:
        """Finish the inference of a claimed job.

        With a SEG and at least one destination the job becomes DELIVERING with one PENDING
        delivery per destination and object (due now): the SEG, or what ``objects`` names
        for that destination; otherwise (nothing to send) it is DONE. The lease is
        released. Deliveries left from an earlier run of the same job are replaced.

        With ``seg_series_instance_uid``, earlier SEGs of that series (other SOP Instance
        UIDs) whose delivery is still waiting for an attempt are dropped: they would only
        land after this one, stale. With ``supersedes``, both jobs record which SEG replaced
        which, and each destination in ``supersedes.notes`` gets a rejection note delivery
        that waits for this SEG's delivery there, provided the destination still holds the
        SEG the note retracts and no newer one (else the note is skipped, with a warning).

        Parameters
        ----------
        job_id, token : int, str
            The claimed job and the token from :meth:`claim`.
        series_instance_uid : str or None
            The series inference ran on.
        seg_path : str or None
            The SEG file in the outbox, or None if none was written.
        seg_sop_instance_uid : str or None
            The SEG's SOP Instance UID.
        outcome : Outcome
            What inference found.
        destinations : Sequence[DeliveryTarget]
            Where the SEG goes.
        seg_series_instance_uid : str or None, optional
            The SEG's Series Instance UID (shared by every version of the result).
        seg_instance_number : int or None, optional
            The SEG's InstanceNumber in that series.
        supersedes : Supersession or None, optional
            The previous SEG of the series and the rejection notes to send.
        objects : Mapping of str to Sequence of OutputObject, optional
            Per destination name, the objects it gets, in sending order (its SEG, SR, SC
            images); a destination not named gets nothing. None: each gets the SEG.
        measurements : Sequence of dict, optional
            Per-segment measurements of the SEG, kept on the job for the admin views.

        Returns
        -------
        JobState
            DELIVERING or DONE.

        Raises
        ------
        ValueError
            ``supersedes`` without a SEG and its series.
        JobLeaseLostError
            If the job is no longer RUNNING under this token; nothing is changed.
        QueueError
            If the database write fails.
        """
        if supersedes is not None and (
            seg_path is None or seg_sop_instance_uid is None or seg_series_instance_uid is None
        ):
            raise ValueError("supersedes needs the SEG's path, SOP and Series Instance UID")
        with self._tx.write("complete") as tx:
            s, now = tx.session, tx.now
            job = q.leased_job(s, job_id, token, "complete")
            job.series_instance_uid = series_instance_uid
            job.seg_path = seg_path
            job.seg_sop_instance_uid = seg_sop_instance_uid
            job.seg_series_instance_uid = seg_series_instance_uid if seg_path else None
            job.seg_instance_number = seg_instance_number if seg_path else None
            job.outcome = outcome
            job.error = None
            job.measurements = list(measurements) if measurements and seg_path else None
            q.clear_lease(job)
            # Notes first: they reference the SEG deliveries of the same job.
            for old in s.scalars(
                select(Delivery)
                .where(Delivery.job_id == job.id)
                .order_by(Delivery.depends_on_id.is_(None))
            ).all():
                s.delete(old)
                s.flush()
            study_uid = q.study_uid(s, job.study_id)
            data = {"outcome": outcome.value, "series_instance_uid": series_instance_uid}
            seg_deliveries: dict[str, Delivery] = {}
            planned: list[tuple[DeliveryTarget, Sequence[OutputObject]]] = []
            if seg_path is not None and seg_sop_instance_uid is not None:
                seg = OutputObject(DeliveryKind.SEG, seg_path, seg_sop_instance_uid)
                for dest in destinations:
                    sent = (seg,) if objects is None else objects.get(dest.name, ())
                    if sent:
                        planned.append((dest, sent))
            if planned:
                job.state = JobState.DELIVERING
                job.delivering_at = now
                for dest, sent in planned:
                    for obj in sent:
                        delivery = versions.new_delivery(
                            tx, job, dest, obj.kind, obj.path, obj.sop_instance_uid
                        )
                        if obj.kind == DeliveryKind.SEG:
                            seg_deliveries.setdefault(dest.name, delivery)
                s.flush()
                message = f"inference done ({outcome.value}); delivering to " + ", ".join(
                    f"{dest.name} ({', '.join(obj.kind.value for obj in sent)})"
                    for dest, sent in planned
                )
                tx.event(job, study_uid, Stage.INFERENCE, message, data=data)
            else:
                job.state = JobState.DONE
                job.finished_at = now
                total = q.total_s(job, now)
                q.add_durations(job, total=total)
                if seg_path is None:
                    reason = "no SEG"
                elif destinations:
                    reason = "no destination takes its outputs"
                else:
                    reason = "no destinations"
                tx.event(
                    job,
                    study_uid,
                    Stage.DONE,
                    f"job done ({outcome.value}, {reason})",
                    duration_s=total,
                    data=data,
                )
            if seg_sop_instance_uid is not None and job.seg_series_instance_uid is not None:
                versions.drop_stale(tx, job, job.seg_series_instance_uid, seg_sop_instance_uid)
            if supersedes is not None:
                versions.record_supersession(
                    tx, job, study_uid, destinations, seg_deliveries, supersedes
                )
            return job.state

    def fail(self, job_id: int, token: str, error: str, retryable: bool = True) -> JobState:
        """Record a failed attempt; requeue with backoff or fail for good.

        Parameters
        ----------
        job_id, token : int, str
            The claimed job and the token from :meth:`claim`.
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
        QueueError
            If the database write fails.
        """
        with self._tx.write("fail") as tx:
            s, now = tx.session, tx.now
            job = q.leased_job(s, job_id, token, "fail")
            job.error = error
            q.clear_lease(job)
            attempt = f"attempt {job.attempts} of {job.max_attempts}"
            if retryable and job.attempts < job.max_attempts:
                wait = self._retry.backoff_s(job.attempts)
                job.state = JobState.QUEUED
                job.not_before = now + timedelta(seconds=wait)
                message, level = f"{attempt} failed, retry in {wait:g}s: {error}", Level.WARNING
            else:
                job.state = JobState.FAILED
                job.finished_at = now
                why = "not retryable" if not retryable else "no attempts left"
                message, level = f"job failed ({why}, {attempt}): {error}", Level.ERROR
            tx.event(
                job,
                q.study_uid(s, job.study_id),
                Stage.FAIL,
                message,
                level=level,
                data={"retryable": retryable, "attempt": job.attempts},
            )
            return job.state

    def study_series(self, study_instance_uid: str) -> dict[str, list[Path]]:
        """Map each series of a study to its instance files.

        Returns
        -------
        dict[str, list[Path]]
            Series Instance UID -> file paths in the order received; empty if unknown.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        result: dict[str, list[Path]] = {}
        with self._tx.read("study_series") as s:
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

    def incoming_instances(self, after_id: int = 0, limit: int = 64) -> list[IncomingInstance]:
        """Instances of the studies no job covers yet, received after instance ``after_id``.

        What the worker may read ahead while the study is still arriving or settling.

        Parameters
        ----------
        after_id : int
            Only instances whose row id is greater (the last one already seen).
        limit : int
            Most rows returned, oldest first.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("incoming_instances") as s:
            rows = s.execute(
                select(Instance.id, Series.series_instance_uid, Series.modality, Instance.path)
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Series.study_id)
                .where(
                    Instance.id > after_id,
                    or_(
                        Study.settled_through.is_(None),
                        Study.last_received_at > Study.settled_through,
                    ),
                )
                .order_by(Instance.id)
                .limit(limit)
            ).all()
        return [
            IncomingInstance(instance_id, uid, modality, Path(path))
            for instance_id, uid, modality, path in rows
        ]


@dataclass(frozen=True)
class IncomingInstance:
    """One received instance of a study still arriving or settling."""

    id: int
    series_instance_uid: str
    modality: str | None
    path: Path
