"""The CLI against real peers and a real job table: echo/send to dcmtk's storescp, jobs admin."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from scp_node.app import build_queue
from scp_node.cli import app
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.records import InstanceRecord
from scp_node.queue.retry import RetryPolicy
from tests.support.net import free_port, wait_for_port
from tests.support.seeded import PAIR_NEW_SEG, PAIR_OLD_SEG, seed_superseding_pair

runner = CliRunner()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """dcmtk's storescp as the receiving peer, accepting any syntax we propose."""
    port, out = free_port(), tmp_path / "received"
    out.mkdir()
    process = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), "+xa", str(port)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port, out
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_echo_and_send_to_storescp(storescp: tuple[int, Path], ct_b_files: list[Path]) -> None:
    port, out = storescp
    assert runner.invoke(app, ["echo", f"STORESCP@127.0.0.1:{port}"]).exit_code == 0
    folder = ct_b_files[0].parent
    result = runner.invoke(app, ["send", str(folder), "--to", f"STORESCP@127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    assert "sent 20/20" in result.output
    received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out.iterdir()}
    assert received == {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct_b_files}


# pynetdicom 3.0.4 leaves the socket of a refused connection for the garbage collector; our
# association helper closes it (a ResourceWarning here would fail the test).
def test_echo_to_nobody_fails_cleanly() -> None:
    result = runner.invoke(app, ["echo", f"NOBODY@127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert "not established" in result.output


def test_jobs_list_show_cancel_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    monkeypatch.setenv("SCP_NODE_DATABASE__URL", url)
    monkeypatch.chdir(tmp_path)  # no ./config.toml here: environment and defaults only
    engine = make_engine(url)
    upgrade(engine)
    store = build_queue(engine, RetryPolicy())
    store.intake.record_instance(
        InstanceRecord(
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
            sop_instance_uid="1.2.3.4.5",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="CT",
            path=str(tmp_path / "x.dcm"),
            size_bytes=10,
            calling_ae="TEST",
        )
    )
    (job_id,) = store.settling.settle(0.0, ["ct-abdomen"])

    listed = json.loads(runner.invoke(app, ["jobs", "--json"]).stdout)
    assert [(j["id"], j["state"], j["study_instance_uid"]) for j in listed] == [
        (job_id, "queued", "1.2.3")
    ]
    assert {"id", "state", "study_instance_uid", "model", "error", "durations"} <= set(listed[0])
    table = runner.invoke(app, ["jobs"])
    assert table.exit_code == 0 and "queued" in table.stdout

    assert runner.invoke(app, ["jobs", "cancel", str(job_id)]).exit_code == 0
    assert store.views.get(job_id).state == "cancelled"
    assert runner.invoke(app, ["jobs", "retry", str(job_id)]).exit_code == 0
    assert store.views.get(job_id).state == "queued"

    shown = json.loads(runner.invoke(app, ["jobs", "show", str(job_id), "--json"]).stdout)
    assert shown["events"][0]["stage"] == "settled"
    assert runner.invoke(app, ["jobs", "show", "999"]).exit_code == 1

    logs = runner.invoke(app, ["logs", "--job", str(job_id), "--json"]).stdout.splitlines()
    assert len(logs) == len(shown["events"])
    assert runner.invoke(app, ["logs", "--since", "1h"]).exit_code == 0
    assert runner.invoke(app, ["logs", "--since", "soon"]).exit_code != 0


def test_jobs_show_says_which_seg_superseded_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    monkeypatch.setenv("SCP_NODE_DATABASE__URL", url)
    monkeypatch.chdir(tmp_path)
    engine = make_engine(url)
    upgrade(engine)
    first, second = seed_superseding_pair(build_queue(engine, RetryPolicy()), "1.2.3")

    new = runner.invoke(app, ["jobs", "show", str(second)], env={"COLUMNS": "200"})
    assert new.exit_code == 0
    assert f"supersedes: {PAIR_OLD_SEG} (instance 1, job {first})" in new.stdout
    assert f"SEG {PAIR_NEW_SEG} (instance 2) supersedes {PAIR_OLD_SEG} (job {first})" in (
        new.stdout
    )
    old = runner.invoke(app, ["jobs", "show", str(first)], env={"COLUMNS": "200"})
    assert f"superseded by: {PAIR_NEW_SEG} (instance 2, job {second})" in old.stdout
    assert f"superseded by {PAIR_NEW_SEG} (job {second})" in old.stdout

    shown = json.loads(runner.invoke(app, ["jobs", "show", str(second), "--json"]).stdout)
    assert shown["supersedes"] == {
        "job_id": first,
        "sop_instance_uid": PAIR_OLD_SEG,
        "instance_number": 1,
    }
    assert shown["superseded_by"] is None
    assert shown["seg_instance_number"] == 2
    assert any(e["stage"] == "supersede" for e in shown["events"])
