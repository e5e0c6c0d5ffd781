"""Intake.record_instance on both backends: rows, counts, re-sends, concurrent writers."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import Engine

from scp_node.app import build_queue
from scp_node.queue import InstanceRecord, Intake, make_engine
from scp_node.spool import Spool, recover_unrecorded
from tests.support.datasets import ct_dataset
from tests.unit.conftest import POLICY, SERIES, STUDY, FakeClock, InstanceFactory, Table


def _paths(table: Table, study: str = STUDY) -> list[Path]:
    return [p for paths in table.work.study_series(study).values() for p in paths]


def test_record_instance_creates_study_series_and_counts(
    table: Table, instance_factory: InstanceFactory
) -> None:
    assert table.intake.record_instance(instance_factory(sop="1.2.3.1"))
    assert table.intake.record_instance(instance_factory(sop="1.2.3.2"))
    assert table.intake.record_instance(
        instance_factory(series="1.2.3.9", sop="1.2.3.3", modality="SR")
    )
    recorded = {p.name for p in _paths(table)}
    assert "1.2.3.1.dcm" in recorded
    assert "9.9.9.dcm" not in recorded
    info = {s.series_instance_uid: s for s in table.views.series_info([STUDY])[STUDY]}
    assert info[SERIES].instance_count == 2
    assert info[SERIES].modality == "CT"
    assert info[SERIES].series_description == "Abdomen"
    assert info["1.2.3.9"].instance_count == 1
    assert [p.name for p in table.work.study_series(STUDY)[SERIES]] == [
        "1.2.3.1.dcm",
        "1.2.3.2.dcm",
    ]
    assert len(_paths(table)) == 3


def test_resent_instance_replaces_row(
    table: Table, clock: FakeClock, instance_factory: InstanceFactory, tmp_path: Path
) -> None:
    assert table.intake.record_instance(instance_factory(sop="1.2.3.1"))
    clock.advance(5)
    again = instance_factory(sop="1.2.3.1", path=str(tmp_path / "new.dcm"), size_bytes=2000)
    assert table.intake.record_instance(again) is False
    assert table.work.study_series(STUDY) == {SERIES: [tmp_path / "new.dcm"]}
    assert table.views.series_info([STUDY])[STUDY][0].instance_count == 1
    # The re-send counts as activity: the study is not quiet yet.
    clock.advance(6)
    assert table.settling.settle(10, ["m"]) == []


def test_instance_resent_under_another_series_and_study_moves_its_counts(
    table: Table, instance_factory: InstanceFactory
) -> None:
    other_study, other_series = "1.2.3.77", "1.2.3.77.1"
    first = [instance_factory(sop=f"1.2.3.5{i}", frame_count=2) for i in range(2)]
    # One batch (a group commit) that creates, then moves, within one transaction.
    moved = instance_factory(study=other_study, series=other_series, sop="1.2.3.50")
    assert table.intake.record_instances([*first, moved]) == [True, True, False]
    info = table.views.series_info([STUDY, other_study])
    assert [(s.series_instance_uid, s.instance_count) for s in info[STUDY]] == [(SERIES, 1)]
    assert [(s.series_instance_uid, s.instance_count) for s in info[other_study]] == [
        (other_series, 1)
    ]
    assert table.work.study_series(other_study) == {other_series: [Path(moved.path)]}
    counts = {v.study_instance_uid: v.instance_count for v in table.settling.unsettled_studies()}
    assert counts == {STUDY: 1, other_study: 1}


def test_concurrent_record_instance_threads(
    db_url: str, engine: Engine, clock: FakeClock, instance_factory: InstanceFactory
) -> None:
    records = [instance_factory() for _ in range(40)]
    errors: list[BaseException] = []

    def run(chunk: list[InstanceRecord]) -> None:
        own = make_engine(db_url)
        try:
            intake = Intake(own, clock)
            for rec in chunk:
                intake.record_instance(rec)
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run, args=(records[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    table = build_queue(engine, POLICY, clock)
    (info,) = table.views.series_info([STUDY])[STUDY]
    assert info.instance_count == 40
    assert len(_paths(table)) == 40


def test_recovery_records_spooled_files_without_a_row_and_only_those(
    table: Table, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    study, series, moved_to = generate_uid(), generate_uid(), generate_uid()

    def spooled(series_uid: str, sop: str) -> Path:
        ds = ct_dataset((study, series_uid, sop))
        path = spool.instance_path(study, series_uid, sop)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    def record(path: Path, series_uid: str) -> None:
        table.intake.record_instance(
            InstanceRecord(
                study_instance_uid=study,
                series_instance_uid=series_uid,
                sop_instance_uid=path.stem,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                modality="CT",
                path=str(path),
                size_bytes=path.stat().st_size,
                calling_ae="MODALITY",
            )
        )

    recorded = spooled(series, generate_uid())
    record(recorded, series)
    lost = spooled(series, generate_uid())  # its row went with a power cut
    # Re-sent under another series: the row points at the newer copy; the old one stays.
    resent = generate_uid()
    old = spooled(series, resent)
    new = spooled(moved_to, resent)
    os.utime(old, ns=(1, 1))
    record(new, moved_to)
    damaged = spool.instance_path(study, series, generate_uid())
    damaged.write_bytes(b"not DICOM")
    torn = damaged.with_name("x.dcm.part")
    torn.write_bytes(b"half")

    assert recover_unrecorded(spool, table.intake) == 1
    assert recover_unrecorded(spool, table.intake) == 0  # idempotent
    paths = {p.name: p for p in _paths(table, study)}
    assert paths[lost.name] == lost
    assert paths[new.name] == new
    assert damaged.exists() and damaged.name not in paths  # left in place, logged
    assert not torn.exists()
    info = {s.series_instance_uid: s for s in table.views.series_info([study])[study]}
    assert info[series].instance_count == 2 and info[moved_to].instance_count == 1
