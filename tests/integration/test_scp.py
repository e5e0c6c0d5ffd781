"""The Storage SCP against real peers on loopback: dcmtk's storescu/echoscu and pynetdicom."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pynetdicom._config
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from scp_node.dicom.handlers import StoreContext
from scp_node.dicom.scp import StorageServer, build_storage_ae
from scp_node.dicom.status import Status
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.intake import Intake
from scp_node.queue.models import Instance
from scp_node.spool import Spool
from tests.support.datasets import ct_dataset
from tests.support.enhanced import legacy_converted
from tests.support.net import free_port, wait_until

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class RunningScp:
    port: int
    spool: Spool
    intake: Intake
    engine: object
    server: StorageServer

    def instance_rows(self) -> int:
        with self.engine.connect() as conn:  # type: ignore[attr-defined]
            return int(conn.execute(select(func.count()).select_from(Instance)).scalar_one())


def _start(tmp_path: Path, *, allowed: tuple[str, ...] = (), min_free: int = 0) -> RunningScp:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    intake = Intake(engine)
    spool = Spool(tmp_path / "spool")
    ae = build_storage_ae("SCPNODE", allowed_calling_ae=allowed)
    port = free_port()
    server = StorageServer(ae, "127.0.0.1", port, StoreContext(spool, intake, min_free))
    return RunningScp(port, spool, intake, engine, server)


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[RunningScp]:
    running = _start(tmp_path, allowed=())
    yield running
    running.server.stop(grace_s=1)


def _storescu(
    port: int, files: list[Path], calling: str = "STORESCU", *options: str
) -> subprocess.CompletedProcess[str]:
    # -xv proposes JPEG 2000 lossless, the syntax of the shared series; files go as they are.
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", "SCPNODE", "-xv", *options, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )


def test_storescu_push_is_stored_as_received(scp: RunningScp, ct_b_files: list[Path]) -> None:
    result = _storescu(scp.port, ct_b_files)
    assert result.returncode == 0, result.stderr
    assert scp.instance_rows() == 20
    for source in ct_b_files:
        original = dcmread(source)
        stored_path = scp.spool.instance_path(
            original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
        )
        stored = dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        # Encapsulated JPEG 2000 bytes unchanged: stored as received, never transcoded.
        assert stored.PixelData == original.PixelData
    assert not list(scp.spool.root.rglob("*.part"))


def test_resent_instance_replaces_its_copy(scp: RunningScp, ct_b_files: list[Path]) -> None:
    assert _storescu(scp.port, ct_b_files[:3]).returncode == 0
    assert _storescu(scp.port, ct_b_files[:3]).returncode == 0
    assert scp.instance_rows() == 3
    assert len(list(scp.spool.root.rglob("*.dcm"))) == 3


def test_echoscu_succeeds(scp: RunningScp) -> None:
    result = subprocess.run(
        ["echoscu", "-aet", "ANYONE", "-aec", "SCPNODE", "127.0.0.1", str(scp.port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_accepted_connection_has_nagle_off(scp: RunningScp) -> None:
    # With Nagle on, each small PDU (a C-STORE response) waits for the peer's delayed ACK.
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="SCPNODE")
    try:
        assert assoc.is_established
        (accepted,) = wait_until(
            lambda: scp.server._server.active_associations, 10, "the accepted association"
        )
        sock = accepted.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()
        ae.shutdown()


def test_unknown_calling_ae_refused_at_association(tmp_path: Path) -> None:
    running = _start(tmp_path, allowed=("GOODSCU",))
    try:
        args = ["-aec", "SCPNODE", "127.0.0.1", str(running.port)]
        bad = subprocess.run(
            ["echoscu", "-aet", "EVILSCU", *args], capture_output=True, text=True, env=DCMTK_ENV
        )
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stderr + bad.stdout
        good = subprocess.run(
            ["echoscu", "-aet", "GOODSCU", *args], capture_output=True, text=True, env=DCMTK_ENV
        )
        assert good.returncode == 0, good.stderr
    finally:
        running.server.stop(grace_s=1)


def _send(port: int, dataset_or_path: Dataset | Path) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset_or_path)
        return int(status.Status)
    finally:
        assoc.release()


def _quarantined(spool: Spool) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(spool.quarantine_dir.glob("*.json"))]


def test_truncated_instance_quarantined_and_node_keeps_serving(scp: RunningScp) -> None:
    # A transfer cut short: pydicom would read it tolerantly; the node must not accept it.
    truncated = ct_dataset()
    truncated.PixelData = b"\x00" * 6
    assert _send(scp.port, truncated) == Status.CANNOT_UNDERSTAND
    (entry,) = _quarantined(scp.spool)
    assert "pixel data has 6 bytes" in str(entry["reason"])
    (kept,) = scp.spool.quarantine_dir.glob("*.dcm")
    assert dcmread(kept).SOPInstanceUID == truncated.SOPInstanceUID
    assert scp.instance_rows() == 0
    assert _send(scp.port, ct_dataset()) == Status.SUCCESS
    assert scp.instance_rows() == 1


def test_garbage_after_file_meta_refused(
    scp: RunningScp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Send the file's bytes as they are, without pydicom decoding (and rejecting) them first.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    good = ct_dataset()
    good.save_as(tmp_path / "good.dcm", enforce_file_format=True)
    raw = (tmp_path / "good.dcm").read_bytes()
    meta_end = raw.index(b"\x08\x00\x16\x00")  # (0008,0016) SOPClassUID: first data element
    garbage = bytes(range(256)) * 2
    (tmp_path / "broken.dcm").write_bytes(raw[:meta_end] + garbage)

    status = _send(scp.port, tmp_path / "broken.dcm")
    assert status in (Status.CANNOT_UNDERSTAND, Status.DATASET_DOES_NOT_MATCH)
    (kept,) = scp.spool.quarantine_dir.glob("*.dcm")
    assert kept.read_bytes().endswith(garbage)
    assert scp.instance_rows() == 0


def test_missing_uid_refused_with_reason(scp: RunningScp) -> None:
    ds = ct_dataset()
    del ds.StudyInstanceUID
    assert _send(scp.port, ds) == Status.DATASET_DOES_NOT_MATCH
    (entry,) = _quarantined(scp.spool)
    assert "StudyInstanceUID" in str(entry["reason"])
    assert scp.instance_rows() == 0


def test_path_traversal_uid_refused(scp: RunningScp) -> None:
    ds = ct_dataset(SeriesInstanceUID="../../etc")
    assert _send(scp.port, ds) == Status.DATASET_DOES_NOT_MATCH
    assert not (scp.spool.root.parent / "etc").exists()


def test_low_disk_refused_with_out_of_resources(tmp_path: Path) -> None:
    running = _start(tmp_path, min_free=2**62)
    try:
        assert _send(running.port, ct_dataset()) == Status.OUT_OF_RESOURCES
        assert running.instance_rows() == 0
    finally:
        running.server.stop(grace_s=1)


def test_stop_finishes_acknowledged_work_and_aborts_idle_associations(tmp_path: Path) -> None:
    running = _start(tmp_path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="SCPNODE")
    assert assoc.is_established
    assert assoc.send_c_store(ct_dataset()).Status == Status.SUCCESS
    running.server.stop(grace_s=5)  # the association stays open and idle: it must not block
    wait_until(lambda: not assoc.is_established, 10, "the idle association to be aborted")
    ae.shutdown()
    assert running.instance_rows() == 1
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=2).close()


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_legacy_converted_enhanced_image_is_accepted(
    scp: RunningScp, ct_b_files: list[Path], tmp_path: Path, modality: str
) -> None:
    path = legacy_converted(ct_b_files, tmp_path / "legacy.dcm", modality=modality)
    # -R: propose the file's own SOP class (not in storescu's default list).
    result = _storescu(scp.port, [path], "STORESCU", "-R")
    assert result.returncode == 0, result.stderr
    assert scp.instance_rows() == 1
    original = dcmread(path, stop_before_pixels=True)
    stored = dcmread(
        scp.spool.instance_path(
            original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID
        ),
        stop_before_pixels=True,
    )
    assert stored.SOPClassUID == original.SOPClassUID
    assert stored.SOPClassUID in (
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    )
    assert int(stored.NumberOfFrames) == 20
