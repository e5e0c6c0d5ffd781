"""Intake: the receive stage's one write, recording each stored instance."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from scp_node.errors import QueueError
from scp_node.queue.models import Instance, Series, Stage, Study
from scp_node.queue.records import InstanceRecord
from scp_node.queue.tx import Clock, Sessions, Tx, utcnow

__all__ = ["Intake"]

_RECORD_TRIES = 3


class Intake:
    """Records instances as the Storage SCP stores them.

    Parameters
    ----------
    engine : Engine
        The migrated job table.
    clock : Callable[[], datetime]
        Timezone-aware current time (injected by tests).
    """

    def __init__(self, engine: Engine, clock: Clock = utcnow) -> None:
        self._tx = Sessions(engine, clock)

    def record_instance(self, rec: InstanceRecord) -> bool:
        """Record a stored instance; a re-sent SOP Instance UID replaces its row.

        Creates the study and series on first sight, counts distinct instances and moves the
        study's ``last_received_at`` to now (so the settle stage waits again). Safe to call
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
        QueueError
            If the database write fails.
        """
        return self.record_instances([rec])[0]

    def instance_paths(self) -> dict[str, str]:
        """Every recorded instance's file: SOP Instance UID -> path in the spool.

        Raises
        ------
        QueueError
            If the database read fails.
        """
        with self._tx.read("instance_paths") as s:
            return {
                uid: path
                for uid, path in s.execute(select(Instance.sop_instance_uid, Instance.path))
            }

    def record_instances(self, recs: Sequence[InstanceRecord]) -> list[bool]:
        """Record several stored instances in one transaction (a group commit).

        Each is recorded as :meth:`record_instance` would, in order; either all rows are
        committed or none.

        Parameters
        ----------
        recs : Sequence[InstanceRecord]
            The instances, each already durable at its ``path``.

        Returns
        -------
        list[bool]
            Per instance, True if its SOP Instance UID was new.

        Raises
        ------
        QueueError
            If the database write fails (nothing of the batch is recorded).
        """
        for attempt in range(1, _RECORD_TRIES + 1):
            try:
                with self._tx.write("record_instance") as tx:
                    rows = _Rows()
                    return [_upsert_instance(tx, rec, rows) for rec in recs]
            except QueueError as exc:
                # Two processes creating the same study/series at once (PostgreSQL): the
                # loser sees a unique violation and retries, finding the winner's row.
                if attempt == _RECORD_TRIES or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


@dataclass
class _Rows:
    """The study and series rows a transaction has locked, so a batch of one series asks
    for them once."""

    studies: dict[str, Study] = field(default_factory=dict)
    series: dict[str, Series] = field(default_factory=dict)


def _upsert_instance(tx: Tx, rec: InstanceRecord, rows: _Rows) -> bool:
    s, now = tx.session, tx.now
    study = (
        rows.studies.get(rec.study_instance_uid)
        or s.scalars(
            select(Study)
            .where(Study.study_instance_uid == rec.study_instance_uid)
            .with_for_update()
        ).one_or_none()
    )
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

    rows.studies[rec.study_instance_uid] = study

    series = (
        rows.series.get(rec.series_instance_uid)
        or s.scalars(
            select(Series)
            .where(Series.series_instance_uid == rec.series_instance_uid)
            .with_for_update()
        ).one_or_none()
    )
    if series is None:
        series = Series(
            study_id=study.id,
            series_instance_uid=rec.series_instance_uid,
            modality=rec.modality,
            series_number=rec.series_number,
            series_description=rec.series_description,
            instance_count=0,
            frame_count=0,
        )
        s.add(series)
        s.flush()
    else:
        series.modality = series.modality or rec.modality
        if series.series_number is None:
            series.series_number = rec.series_number
        series.series_description = series.series_description or rec.series_description
    rows.series[rec.series_instance_uid] = series
    _record_routing_facts(series, rec)

    instance = s.scalars(
        select(Instance).where(Instance.sop_instance_uid == rec.sop_instance_uid).with_for_update()
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
        series.frame_count += rec.frame_count
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
            series.frame_count += rec.frame_count
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
                "stage": Stage.RECEIVE.value,
            },
        )
    )
    return is_new


def _record_routing_facts(series: Series, rec: InstanceRecord) -> None:
    """Keep the first known value of each routing fact (see ``SeriesFacts``)."""
    if series.body_part_examined is None and rec.body_part_examined:
        series.body_part_examined = rec.body_part_examined[:16]
    if series.slice_thickness_mm is None:
        series.slice_thickness_mm = rec.slice_thickness_mm
    if series.orientation is None and rec.orientation is not None:
        series.orientation = "\\".join(f"{v:.6g}" for v in rec.orientation)
