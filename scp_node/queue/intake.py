"""Intake: the receive stage's one write, recording each stored instance."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Engine, Insert, Select, Table, bindparam, insert, select, update
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
                    results = [_upsert_instance(tx, rec, rows) for rec in recs]
                    rows.flush(tx.session.connection())
                    return results
            except QueueError as exc:
                # Two processes creating the same study/series at once (PostgreSQL): the
                # loser sees a unique violation and retries, finding the winner's row.
                if attempt == _RECORD_TRIES or not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)

# Every statement of a record is built once, here, with bound parameters: building and
# hashing a statement per execution cost SQLAlchemy more CPU than the SQL itself (the
# receive stage records each instance as it arrives).
_SELECT_STUDY = (
    select(
        _STUDIES.c.id,
        _STUDIES.c.study_date,
        _STUDIES.c.last_received_at,
        _STUDIES.c.instance_count,
    )
    .where(_STUDIES.c.study_instance_uid == bindparam("uid"))
    .with_for_update()
)
_SELECT_STUDY_UID = select(_STUDIES.c.study_instance_uid).where(
    _STUDIES.c.id == bindparam("study_id")
)
_INSERT_STUDY = insert(_STUDIES)
_UPDATE_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("row_id"))
    .values(
        study_date=bindparam("study_date"),
        last_received_at=bindparam("last_received_at"),
        instance_count=bindparam("instance_count"),
    )
)
_SERIES_COLUMNS = (
    _SERIES.c.id,
    _SERIES.c.study_id,
    _SERIES.c.series_instance_uid,
    _SERIES.c.modality,
    _SERIES.c.series_number,
    _SERIES.c.series_description,
    _SERIES.c.instance_count,
    _SERIES.c.frame_count,
    _SERIES.c.body_part_examined,
    _SERIES.c.slice_thickness_mm,
    _SERIES.c.orientation,
)
_SELECT_SERIES_BY_UID = (
    select(*_SERIES_COLUMNS)
    .where(_SERIES.c.series_instance_uid == bindparam("uid"))
    .with_for_update()
)
_SELECT_SERIES_BY_ID = (
    select(*_SERIES_COLUMNS).where(_SERIES.c.id == bindparam("row_id")).with_for_update()
)
_INSERT_SERIES = insert(_SERIES)
_SERIES_UPDATED = (
    "modality",
    "series_number",
    "series_description",
    "instance_count",
    "frame_count",
    "body_part_examined",
    "slice_thickness_mm",
    "orientation",
)
_UPDATE_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("row_id"))
    .values({name: bindparam(name) for name in _SERIES_UPDATED})
)
_SELECT_INSTANCE = (
    select(_INSTANCES.c.id, _INSTANCES.c.series_id)
    .where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
    .with_for_update()
)
_INSERT_INSTANCE = insert(_INSTANCES)
_INSTANCE_UPDATED = (
    "series_id",
    "sop_class_uid",
    "transfer_syntax_uid",
    "path",
    "size_bytes",
    "calling_ae",
    "received_at",
)
_UPDATE_INSTANCE = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("row_id"))
    .values({name: bindparam(name) for name in _INSTANCE_UPDATED})
)


def _inserted_id(conn: Connection, statement: Insert, values: dict[str, object]) -> int:
    key = conn.execute(statement, values).inserted_primary_key
    assert key is not None  # every table has an integer primary key
    return int(key[0])


@dataclass
class _StudyRow:
    id: int
    study_date: str | None
    last_received_at: datetime
    instance_count: int
    dirty: bool = False


@dataclass
class _SeriesRow:
    id: int
    study_id: int
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int
    frame_count: int
    body_part_examined: str | None
    slice_thickness_mm: float | None
    orientation: str | None
    dirty: bool = False


@dataclass
class _Rows:
    """The study and series rows a transaction has locked and changed: read once per
    batch, written once at its end (SQLAlchemy Core: the ORM's unit of work cost about as
    much CPU per instance as the SQL itself)."""

    studies: dict[str, _StudyRow] = field(default_factory=dict)
    series: dict[str, _SeriesRow] = field(default_factory=dict)

    def flush(self, conn: Connection) -> None:
        for study in self.studies.values():
            if study.dirty:
                conn.execute(
                    _UPDATE_STUDY,
                    {
                        "row_id": study.id,
                        "study_date": study.study_date,
                        "last_received_at": study.last_received_at,
                        "instance_count": study.instance_count,
                    },
                )
        for series in self.series.values():
            if series.dirty:
                conn.execute(
                    _UPDATE_SERIES,
                    {"row_id": series.id, **{n: getattr(series, n) for n in _SERIES_UPDATED}},
                )


def _study_row(conn: Connection, rows: _Rows, uid: str) -> _StudyRow | None:
    if uid in rows.studies:
        return rows.studies[uid]
    found = conn.execute(_SELECT_STUDY, {"uid": uid}).one_or_none()
    if found is None:
        return None
    rows.studies[uid] = row = _StudyRow(*found)
    return row


def _series_row(
    conn: Connection, rows: _Rows, statement: Select[Any], key: dict[str, object]
) -> _SeriesRow | None:
    found = conn.execute(statement, key).one_or_none()
    if found is None:
        return None
    row = _SeriesRow(*found)
    return rows.series.setdefault(row.series_instance_uid, row)


def _study_by_id(conn: Connection, rows: _Rows, study_id: int) -> _StudyRow | None:
    for row in rows.studies.values():
        if row.id == study_id:
            return row
    uid = conn.execute(_SELECT_STUDY_UID, {"study_id": study_id}).scalar_one_or_none()
    return None if uid is None else _study_row(conn, rows, uid)


def _upsert_instance(tx: Tx, rec: InstanceRecord, rows: _Rows) -> bool:
    conn, now = tx.session.connection(), tx.now
    study = _study_row(conn, rows, rec.study_instance_uid)
    if study is None:
        study_id = _inserted_id(
            conn,
            _INSERT_STUDY,
            {
                "study_instance_uid": rec.study_instance_uid,
                "study_date": rec.study_date,
                "first_received_at": now,
                "last_received_at": now,
                "instance_count": 0,
            },
        )
        study = rows.studies[rec.study_instance_uid] = _StudyRow(study_id, rec.study_date, now, 0)
    elif study.study_date is None and rec.study_date:
        study.study_date, study.dirty = rec.study_date, True

    series = rows.series.get(rec.series_instance_uid) or _series_row(
        conn, rows, _SELECT_SERIES_BY_UID, {"uid": rec.series_instance_uid}
    )
    if series is None:
        series_id = _inserted_id(
            conn,
            _INSERT_SERIES,
            {
                "study_id": study.id,
                "series_instance_uid": rec.series_instance_uid,
                "modality": rec.modality,
                "series_number": rec.series_number,
                "series_description": rec.series_description,
                "instance_count": 0,
                "frame_count": 0,
            },
        )
        series = rows.series[rec.series_instance_uid] = _SeriesRow(
            series_id,
            study.id,
            rec.series_instance_uid,
            rec.modality,
            rec.series_number,
            rec.series_description,
            0,
            0,
            None,
            None,
            None,
        )
    else:
        _fill(series, "modality", rec.modality)
        _fill(series, "series_number", rec.series_number)
        _fill(series, "series_description", rec.series_description)
    _record_routing_facts(series, rec)

    instance = conn.execute(_SELECT_INSTANCE, {"uid": rec.sop_instance_uid}).one_or_none()
    is_new = instance is None
    values: dict[str, object] = {
        "series_id": series.id,
        "sop_class_uid": rec.sop_class_uid,
        "transfer_syntax_uid": rec.transfer_syntax_uid,
        "path": rec.path,
        "size_bytes": rec.size_bytes,
        "calling_ae": rec.calling_ae,
        "received_at": now,
    }
    if instance is None:
        conn.execute(_INSERT_INSTANCE, {"sop_instance_uid": rec.sop_instance_uid, **values})
        series.instance_count += 1
        series.frame_count += rec.frame_count
        study.instance_count += 1
        series.dirty = study.dirty = True
    else:
        instance_id, old_series_id = instance
        if old_series_id != series.id:
            # Re-sent under another series: keep the counts true.
            old = _series_row(conn, rows, _SELECT_SERIES_BY_ID, {"row_id": old_series_id})
            if old is not None:
                old.instance_count -= 1
                old.dirty = True
                if old.study_id != series.study_id:
                    old_study = _study_by_id(conn, rows, old.study_id)
                    if old_study is not None:
                        old_study.instance_count -= 1
                        old_study.dirty = True
                    study.instance_count += 1
            series.instance_count += 1
            series.frame_count += rec.frame_count
            series.dirty = study.dirty = True
        conn.execute(_UPDATE_INSTANCE, {"row_id": instance_id, **values})
    if now > study.last_received_at:
        study.last_received_at, study.dirty = now, True
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


def _fill(series: _SeriesRow, name: str, value: object) -> None:
    """Keep the first known value of a series attribute."""
    if getattr(series, name) is None and value not in (None, ""):
        setattr(series, name, value)
        series.dirty = True


def _record_routing_facts(series: _SeriesRow, rec: InstanceRecord) -> None:
    """Keep the first known value of each routing fact (see ``SeriesFacts``)."""
    if rec.body_part_examined:
        _fill(series, "body_part_examined", rec.body_part_examined[:16])
    _fill(series, "slice_thickness_mm", rec.slice_thickness_mm)
    if rec.orientation is not None:
        _fill(series, "orientation", "\\".join(f"{v:.6g}" for v in rec.orientation))
