"""Hostile input: property-based fuzzing of the C-STORE path over real associations.

hypothesis builds damaged instances of seven kinds (truncated, wrong VR, huge length,
missing UID, path-traversal UID, zero pixels, non-image SOP class), each sent over a real
pynetdicom association to the Storage SCP on loopback, bytes as they are (no encoding by the
sender). Each must get a failure status and a quarantine entry, add no row and no spool file,
and the SCP must keep serving (a valid instance is accepted after the run).

Bounded: ``SCP_NODE_FUZZ_EXAMPLES`` examples (default 150; about 20 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom._config
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
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
from tests.support.net import free_port

EXAMPLES = int(os.environ.get("SCP_NODE_FUZZ_EXAMPLES", "150"))
ROOT = "1.2.826.0.1.3680043.8.498.77"


@dataclass
class Scp:
    port: int
    spool: Spool
    engine: Any
    server: StorageServer
    work: Path

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Instance)).scalar_one())

    def quarantined(self) -> int:
        return len(list(self.spool.quarantine_dir.glob("*.json")))

    def spooled(self) -> int:
        return len(list(self.spool.root.rglob("*.dcm")))


@pytest.fixture
def scp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scp]:
    # The sender sends files' bytes as they are, without pydicom decoding them first.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    intake = Intake(engine)
    spool = Spool(tmp_path / "spool")
    port = free_port()
    server = StorageServer(
        build_storage_ae("SCPNODE"), "127.0.0.1", port, StoreContext(spool, intake, 0)
    )
    work = tmp_path / "cases"
    work.mkdir()
    yield Scp(port, spool, engine, server, work)
    server.stop(grace_s=1)
    engine.dispose()


def _ct(n: int = 1, **overrides: Any) -> Dataset:
    # UIDs from a drawn number (not random): hypothesis must be able to replay a case.
    uids = (f"{ROOT}.{n}.1", f"{ROOT}.{n}.2", f"{ROOT}.{n}.3")
    return ct_dataset(uids, size=4, PatientName="Fuzz^Patient", **overrides)


def _file_bytes(ds: Dataset) -> bytes:
    """Part-10 bytes with a file meta that names the data set's (claimed) SOP UIDs."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = str(ds.get("SOPInstanceUID") or f"{ROOT}.0")
    from io import BytesIO

    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _body_start(raw: bytes) -> int:
    """Offset of the first data set element after the file meta group."""
    return raw.index(b"\x08\x00", 132 + 12 + struct.unpack_from("<I", raw, 140)[0])


def _element_offset(raw: bytes, tag: tuple[int, int]) -> int:
    needle = struct.pack("<HH", *tag)
    return raw.index(needle, _body_start(raw))


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(
        st.sampled_from(
            [
                "truncated",
                "wrong_vr",
                "huge_length",
                "missing_uid",
                "traversal_uid",
                "zero_pixels",
                "non_image",
            ]
        )
    )
    n = draw(st.integers(1, 10**9))
    if kind == "truncated":
        raw = _file_bytes(_ct(n))
        return kind, raw[: draw(st.integers(_body_start(raw) + 1, len(raw) - 2))]
    if kind == "wrong_vr":
        raw = bytearray(_file_bytes(_ct(n)))
        tag = draw(st.sampled_from([(0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100)]))
        at = _element_offset(bytes(raw), tag) + 4
        vr = draw(st.sampled_from([b"UI", b"DA", b"SQ", b"OB", b"FD", b"XX", b"\x00\x00"]))
        raw[at : at + 2] = vr
        return kind, bytes(raw)
    if kind == "huge_length":
        raw = bytearray(_file_bytes(_ct(n)))
        at = _element_offset(bytes(raw), (0x7FE0, 0x0010)) + 8  # OW: 2 reserved, 4 length
        raw[at : at + 4] = struct.pack("<I", draw(st.integers(0x10000, 0xFFFFFFFE)))
        return kind, bytes(raw)
    if kind == "missing_uid":
        keyword = draw(st.sampled_from(["StudyInstanceUID", "SeriesInstanceUID"]))
        return kind, _file_bytes(_ct(n, **{keyword: None}))
    if kind == "traversal_uid":
        bad = draw(
            st.sampled_from(["../../etc", "..", "/etc/passwd", "1.2/../../x", "1.2\\..\\x"])
            | st.text(alphabet="./\\0123456789abc", min_size=1, max_size=64).filter(
                lambda s: "/" in s or "\\" in s or ".." in s or s.startswith(".")
            )
        )
        keyword = draw(st.sampled_from(["StudyInstanceUID", "SeriesInstanceUID"]))
        return kind, _file_bytes(_ct(n, **{keyword: bad}))
    if kind == "zero_pixels":
        variant = draw(st.sampled_from(["rows", "columns", "empty"]))
        if variant == "empty":
            return kind, _file_bytes(_ct(n, PixelData=b""))
        return kind, _file_bytes(_ct(n, **{"Rows" if variant == "rows" else "Columns": 0}))
    # A non-image data set (a text report's content) sent over the CT context: the SCP only
    # negotiates image storage, so the C-STORE names CT while the body is a report.
    ds = _ct(n, PixelData=None, Rows=None, Columns=None, BitsAllocated=None)
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    return kind, _file_bytes(ds)


def _send_bytes(port: int, path: Path) -> int:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE")
    assert assoc.is_established, "the SCP stopped accepting associations"
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if status else -1
    finally:
        if assoc.is_established:
            assoc.release()


FAILURE = {int(Status.CANNOT_UNDERSTAND), int(Status.DATASET_DOES_NOT_MATCH)}


@pytest.mark.slow
def test_hostile_instances_are_refused_quarantined_and_the_scp_keeps_serving(scp: Scp) -> None:
    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(case=hostile())
    def run(case: tuple[str, bytes]) -> None:
        kind, data = case
        seen[kind] = seen.get(kind, 0) + 1
        path = scp.work / f"case{sum(seen.values())}.dcm"
        path.write_bytes(data)
        before = (scp.rows(), scp.quarantined(), scp.spooled())
        status = _send_bytes(scp.port, path)
        note(f"{kind}: status 0x{status:04X}")
        assert status in FAILURE, f"{kind} got status 0x{status:04X}"
        assert scp.rows() == before[0], f"{kind} was recorded"
        assert scp.spooled() == before[2], f"{kind} reached the spool"
        assert scp.quarantined() == before[1] + 1, f"{kind} has no quarantine entry"
        newest = max(scp.spool.quarantine_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        assert json.loads(newest.read_text())["reason"]

    run()
    # Still serving: a valid instance is accepted.
    good = scp.work / "good.dcm"
    good.write_bytes(_file_bytes(_ct()))
    assert _send_bytes(scp.port, good) == Status.SUCCESS
    assert scp.rows() == 1
    print(f"\nfuzz cases per kind: {seen}")  # noqa: T201 - the figures for the closing note
