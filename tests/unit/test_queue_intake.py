"""Intake.record_instance on both backends: rows, counts, re-sends, concurrent writers."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine

from scp_node.app import build_queue
from scp_node.queue import InstanceRecord, Intake, make_engine
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
