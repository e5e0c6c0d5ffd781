"""CLI polish: `logs` filters by state and study and colours by level; `jobs` shows the
page's columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scp_node.app import build_queue
from scp_node.cli import app
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.records import InstanceRecord
from scp_node.queue.retry import RetryPolicy

runner = CliRunner()


def test_logs_filters_and_jobs_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    monkeypatch.setenv("SCP_NODE_DATABASE__URL", url)
    monkeypatch.chdir(tmp_path)
    engine = make_engine(url)
    upgrade(engine)
    store = build_queue(engine, RetryPolicy())
    for study in ("1.2.3", "1.2.4"):
        store.intake.record_instance(
            InstanceRecord(
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                sop_instance_uid=f"{study}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                modality="CT",
                path=str(tmp_path / f"{study}.dcm"),
                size_bytes=10,
                calling_ae="TEST",
                series_description="ABDOMEN",
            )
        )
    first, second = sorted(store.settling.settle(0.0, ["ct-abdomen"]))
    store.admin.cancel(first)

    def events(*args: str) -> list[dict[str, object]]:
        result = runner.invoke(app, ["logs", "--json", *args])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    assert {e["job_id"] for e in events()} == {first, second}
    assert [(e["job_id"], e["stage"]) for e in events("--state", "cancelled")] == [
        (first, "cancel")
    ]
    assert {e["job_id"] for e in events("--study", "1.2.4")} == {second}
    assert events("--study", "9.9") == []

    colored = runner.invoke(app, ["logs"], env={"FORCE_COLOR": "1", "COLUMNS": "200"})
    assert colored.exit_code == 0
    assert "WARNING" in colored.stdout and "INFO" in colored.stdout

    table = runner.invoke(app, ["jobs"], env={"COLUMNS": "240"})
    assert table.exit_code == 0
    assert "ABDOMEN" in table.stdout and "series" in table.stdout and "age" in table.stdout


def test_jobs_table_is_readable_in_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    monkeypatch.setenv("SCP_NODE_DATABASE__URL", url)
    monkeypatch.chdir(tmp_path)
    engine = make_engine(url)
    upgrade(engine)
    store = build_queue(engine, RetryPolicy())
    # Real-world UIDs are long; so are some series descriptions.
    studies = [f"1.2.826.0.1.3680043.8.498.{n}0123456789012345" for n in range(1, 4)]
    for study in studies:
        store.intake.record_instance(
            InstanceRecord(
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                sop_instance_uid=f"{study}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                modality="CT",
                path=str(tmp_path / f"{study}.dcm"),
                size_bytes=10,
                calling_ae="TEST",
                series_description="ABDOMEN PORTAL VENOUS 1.25mm SOFT TISSUE KERNEL B30f",
            )
        )
    ids = sorted(store.settling.settle(0.0, ["ct-abdomen"]))
    store.admin.cancel(ids[0])

    result = runner.invoke(app, ["jobs"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), result.stdout
    header = next(line for line in lines if "state" in line)
    for column in ("id", "state", "model", "study", "series", "age", "total"):
        assert f" {column} " in f" {header} ", header
    for job_id, study in zip(ids, studies, strict=True):
        # Each job is one line on which its id, state, model and study end are whole.
        state = "cancelled" if job_id == ids[0] else "queued"
        (line,) = [line for line in lines if f" {job_id} " in line and "ct-abdomen" in line]
        assert state in line and "…" + study[-12:] in line, line
        assert "ABDOMEN" in line, line

    wide = runner.invoke(app, ["jobs", "--wide"], env={"COLUMNS": "240"})
    assert wide.exit_code == 0
    for column in ("try", "date", "mod", "slices", "outcome", "time per stage", "error"):
        assert column in wide.stdout, column
