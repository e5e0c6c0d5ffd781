"""``node.receivers = 2``: two Storage SCP processes on one port, with real senders (dcmtk's
storescu and pynetdicom) on loopback: concurrent senders, kill -9 of the receiver holding an
association, and the access rules in every receiver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import create_engine, text

from tests.support.cluster import NodeProc, StudyMaker, send_until_broken, sop_of
from tests.support.config import write_config
from tests.support.net import free_port, wait_until
from tests.support.receivers import holder_of, receiver_pids

pytestmark = pytest.mark.slow  # node processes that spawn receiver processes

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _rows(db_url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


@contextmanager
def _node(
    tmp_path: Path, command: str = "receive", **node: object
) -> Iterator[tuple[NodeProc, int, str]]:
    port = free_port()
    config = write_config(
        tmp_path,
        port,
        free_port(),
        node={"receivers": 2, **node},
        settle={"quiet_s": 600.0, "poll_s": 1.0},
    )
    proc = NodeProc(command, config, tmp_path, command, port=port).start()
    assert proc.process is not None
    pid = proc.process.pid
    wait_until(lambda: len(receiver_pids(pid)) == 2, 120, "two receivers")
    try:
        yield proc, port, f"sqlite:///{tmp_path / 'node.db'}"
    finally:
        proc.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeProc, int, str]]:
    with _node(tmp_path) as running:
        yield running


def _check_stored_once(db_url: str, sops: set[str]) -> None:
    """One row per SOP Instance UID, its spool file holding that instance."""
    rows = _rows(db_url, "SELECT sop_instance_uid, path FROM instances")
    assert len(rows) == len({uid for uid, _path in rows}), "an instance has two rows"
    paths = {str(uid): Path(str(path)) for uid, path in rows}
    assert sops <= set(paths), f"{len(sops - set(paths))} acknowledged instances have no row"
    for uid in sops:
        assert str(dcmread(paths[uid], stop_before_pixels=True).SOPInstanceUID) == uid


def _nice(pid: int, tid: int | None = None) -> int:
    return int(_proc_stat(pid, tid)[16])


def _proc_stat(pid: int, tid: int | None) -> list[str]:
    text = Path(f"/proc/{pid}/task/{tid or pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _received_metric(web_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as answer:
        text_ = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text_)
        for sample in family.samples
        if sample.name == "scp_node_instances_received_total"
    )


def _healthz(web_port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=10) as answer:
            body: dict[str, Any] = json.loads(answer.read())
    except urllib.error.HTTPError as failing:  # 503: a check failed; the body says which
        body = json.loads(failing.read())
    return body


def _health_page(web_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health", timeout=10) as answer:
        return str(answer.read().decode())


def test_concurrent_storescu_senders_into_two_receivers_store_every_instance_once(
    tmp_path: Path, ct_b_files: list[Path]
) -> None:
    with _node(tmp_path, "serve") as (proc, port, db_url):
        assert proc.process is not None
        # Receiving keeps priority over inference: the receivers run at the node's own nice
        # value, the main thread (whose later threads infer) at worker.nice = 10 more.
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert [_nice(pid) for pid in receiver_pids(proc.process.pid)] == [base, base]
        main_pid = proc.process.pid
        wait_until(lambda: _nice(main_pid) == min(base + 10, 19), 60, "the main thread's nice")
        maker = StudyMaker(ct_b_files)
        studies = [maker.make(tmp_path / f"study{i}", 15) for i in range(4)]
        senders = [
            subprocess.Popen(
                ["storescu", "-aet", f"SENDER{i}", "-aec", "SCPNODE", "127.0.0.1", str(port)]
                + [str(f) for f in files],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )
            for i, files in enumerate(studies)
        ]
        for sender in senders:
            out, _ = sender.communicate(timeout=300)
            assert sender.returncode == 0, out
        sent = {sop_of(path) for files in studies for path in files}
        _check_stored_once(db_url, sent)
        assert len(_rows(db_url, "SELECT id FROM instances")) == len(sent) == 60
        counts = _rows(db_url, "SELECT instance_count FROM studies")
        assert sorted(int(c) for (c,) in counts) == [15, 15, 15, 15]
        assert not list((tmp_path / "spool").rglob("*.part"))
        # Stored by the receivers, counted in the main process's /metrics.
        web_port = tomllib.loads(proc.config.read_text())["web"]["port"]
        wait_until(lambda: _received_metric(web_port) == len(sent), 30, "the relayed counts")
        # /healthz and the health page show each receiver and what it handled.
        receivers = _healthz(web_port)["receivers"]
        assert [r["index"] for r in receivers] == [0, 1]
        assert {r["pid"] for r in receivers} == set(receiver_pids(main_pid))
        assert all(r["alive"] and r["restarts"] == 0 for r in receivers)
        # Round-robin: at least 2 senders each (the start-up wait's probe connected too).
        assert min(r["connections"] for r in receivers) >= 2
        assert sum(r["instances"] for r in receivers) == 60
        assert all(r["refused"] == 0 for r in receivers)
        page = _health_page(web_port)
        assert 'data-receiver="1" data-alive="true"' in page
        assert proc.stop() == 0


def test_kill9_of_the_receiver_holding_an_association_keeps_what_it_acknowledged(
    node: tuple[NodeProc, int, str], tmp_path: Path, ct_b_files: list[Path]
) -> None:
    proc, port, db_url = node
    assert proc.process is not None
    pid = proc.process.pid
    files = StudyMaker(ct_b_files).make(tmp_path / "study", 40)
    acked: set[str] = set()
    some_acked = threading.Event()
    client_port: list[int] = []

    def send() -> None:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE")
        assert assoc.is_established
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        assert raw is not None
        client_port.append(int(raw.getsockname()[1]))
        try:
            for path in files:
                status = assoc.send_c_store(dcmread(path))
                if not status or int(status.Status) != 0:
                    return
                acked.add(sop_of(path))
                if len(acked) == 5:
                    some_acked.set()
        finally:
            some_acked.set()
            if assoc.is_established:
                assoc.abort()
            raw.close()

    sender = threading.Thread(target=send)
    sender.start()
    assert some_acked.wait(120)
    before = receiver_pids(pid)
    holder = holder_of(before, port, client_port[0])
    assert holder is not None, "no receiver holds the sender's connection"
    os.kill(holder, signal.SIGKILL)
    sender.join(120)
    assert 5 <= len(acked) < len(files), "the kill did not interrupt the association"
    _check_stored_once(db_url, acked)

    # The main process restarts the dead receiver; the sender resends the rest.
    wait_until(
        lambda: len(now := receiver_pids(pid)) == 2 and holder not in now,
        120,
        "the killed receiver to be replaced",
    )
    wait_until(lambda: send_until_broken(port, files, acked), 120, "every instance acknowledged")
    _check_stored_once(db_url, {sop_of(path) for path in files})
    assert len(_rows(db_url, "SELECT id FROM instances")) == len(files)
    health = _healthz(tomllib.loads(proc.config.read_text())["web"]["port"])
    receivers = health["receivers"]
    assert sorted(r["restarts"] for r in receivers) == [0, 1]
    assert holder not in {r["pid"] for r in receivers}
    assert all(r["alive"] for r in receivers)
    assert health["checks"]["receiver 0"]["ok"] and health["checks"]["receiver 1"]["ok"]
    assert proc.stop() == 0
    assert '"msg":"receiver died; restarting it"' in proc.log.read_text()


def _echo(port: int, calling_ae: str, source: str) -> bool:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE", bind_address=(source, 0))
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    try:
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and int(status.Status) == 0
    finally:
        if raw is not None:
            raw.close()


def test_every_receiver_applies_the_ae_and_source_address_allow_lists(tmp_path: Path) -> None:
    with _node(tmp_path, allowed_calling_ae=["GOODSCU"], allowed_source_ips=["127.0.0.1/32"]) as (
        proc,
        port,
        _db_url,
    ):
        logs = [tmp_path / "log" / f"receiver-{i}.log" for i in range(2)]

        def refused_in(log: Path) -> bool:
            return log.exists() and "source address not allowed" in log.read_text()

        # Connections go to the receivers in turn: try until each has refused one.
        for _attempt in range(60):
            assert not _echo(port, "GOODSCU", source="127.0.0.2")
            if all(refused_in(log) for log in logs):
                break
        assert all(refused_in(log) for log in logs), "a receiver never saw a refused source"
        for _attempt in range(10):
            assert not _echo(port, "EVILSCU", source="127.0.0.1")
            assert _echo(port, "GOODSCU", source="127.0.0.1")
        assert proc.stop() == 0


def test_rows_a_power_cut_took_are_restored_from_the_spool_at_start(
    tmp_path: Path, ct_b_files: list[Path]
) -> None:
    """The receivers commit rows with synchronous=NORMAL: a power cut may lose the last
    ones, never their files (fsynced before the answer). Simulated by deleting the last
    rows (and their counts) as a lost tail of the write-ahead log would."""
    files = StudyMaker(ct_b_files).make(tmp_path / "study", 10)
    sent = {sop_of(path) for path in files}
    with _node(tmp_path) as (proc, port, db_url):
        out = subprocess.run(
            ["storescu", "-aec", "SCPNODE", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            env=DCMTK_ENV,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert proc.stop() == 0
    lost = sorted(sent)[:3]
    engine = create_engine(db_url)
    with engine.begin() as conn:
        paths = [
            Path(
                str(
                    conn.execute(
                        text("SELECT path FROM instances WHERE sop_instance_uid = :u"), {"u": uid}
                    ).scalar_one()
                )
            )
            for uid in lost
        ]
        for uid in lost:
            conn.execute(text("DELETE FROM instances WHERE sop_instance_uid = :u"), {"u": uid})
        conn.execute(text("UPDATE series SET instance_count = 7, frame_count = 7"))
        conn.execute(text("UPDATE studies SET instance_count = 7"))
    engine.dispose()
    # A write a crash interrupted (never acknowledged) is removed, not recorded.
    part = paths[0].with_name("1.2.3.4.part")
    part.write_bytes(b"torn")
    with _node(tmp_path) as (proc, _port, db_url):
        _check_stored_once(db_url, sent)
        assert sorted(
            Path(str(p)) for (p,) in _rows(db_url, "SELECT path FROM instances")
        ) == sorted(Path(str(p)) for p in (tmp_path / "spool").rglob("*.dcm"))
        assert _rows(db_url, "SELECT instance_count FROM studies") == [(10,)]
        assert _rows(db_url, "SELECT instance_count, frame_count FROM series") == [(10, 10)]
        assert not part.exists()
        assert proc.stop() == 0
    assert '"msg":"spooled instances without a row recorded"' in proc.log.read_text()


def test_one_receiver_runs_in_the_node_process_and_shows_on_the_health_page(
    tmp_path: Path, ct_b_files: list[Path]
) -> None:
    port = free_port()
    config = write_config(
        tmp_path, port, free_port(), node={"receivers": 1}, settle={"quiet_s": 600.0}
    )
    proc = NodeProc("receive", config, tmp_path, "receive", port=port).start()
    try:
        assert proc.process is not None
        assert receiver_pids(proc.process.pid) == []  # no spawned receiver
        files = StudyMaker(ct_b_files).make(tmp_path / "study", 5)
        out = subprocess.run(
            ["storescu", "-aec", "SCPNODE", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            env=DCMTK_ENV,
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        _check_stored_once(f"sqlite:///{tmp_path / 'node.db'}", {sop_of(f) for f in files})
        health = _healthz(tomllib.loads(config.read_text())["web"]["port"])
        (receiver,) = health["receivers"]
        assert receiver["pid"] == proc.process.pid and receiver["alive"]
        assert receiver["instances"] == 5 and receiver["connections"] >= 1
        assert health["checks"]["receiver 0"]["ok"]
    finally:
        assert proc.stop() == 0
