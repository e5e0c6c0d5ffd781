"""Harness for the fault and scale-out tests: node processes, study generation, a sender that
tracks acknowledgements, and the exactly-once checks.

Everything is real: ``scp-node`` subprocesses, pynetdicom associations on loopback, the job
table read through SQLAlchemy (SQLite file or PostgreSQL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import create_engine, text

from tests.support.net import PacsStub, wait_for_port

SCP_NODE = Path(sys.executable).parent / "scp-node"


# -- processes ------------------------------------------------------------------------------


@dataclass
class NodeProc:
    """One ``scp-node <command> --config CONFIG`` subprocess, output appended to ``log``."""

    command: str
    config: Path
    root: Path
    name: str
    port: int | None = None
    #: Extra environment, e.g. ``SCP_NODE_WEB__PORT`` for processes that share one config.
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / f"{self.name}.out"

    def start(self, wait: bool = True) -> NodeProc:
        """Start the process; with ``wait`` and a ``port``, return once it listens."""
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                [str(SCP_NODE), self.command, "--config", str(self.config)],
                cwd=self.root,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        if wait and self.port is not None:
            try:
                wait_for_port(self.port, timeout_s=120)
            except TimeoutError:
                self.kill9()
                raise AssertionError(
                    f"{self.name} did not start:\n{self.log.read_text()[-4000:]}"
                ) from None
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or released."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after 60 s)."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self.process = None
        return code


# -- studies --------------------------------------------------------------------------------


class StudyMaker:
    """Realistic CT studies: subject B's real slices, decoded once, restacked 2 mm apart
    under fresh UIDs (uncompressed), with the patient's real name/ID/birth date kept."""

    def __init__(self, source_files: Sequence[Path]) -> None:
        self._sources: list[Dataset] = []
        for path in source_files:
            ds = dcmread(path)
            pixels = ds.pixel_array.astype(np.int16 if ds.PixelRepresentation else np.uint16)
            ds.PixelData = pixels.tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            self._sources.append(ds)
        self._sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))

    def make(self, out: Path, slices: int) -> list[Path]:
        """Write one new study of one ``slices``-slice series under ``out``."""
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        z0 = float(self._sources[0].ImagePositionPatient[2])
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(slices):
            ds = self._sources[i % len(self._sources)].copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID = frame
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z0 + 2.0 * i]
            ds.SliceLocation = z0 + 2.0 * i
            path = out / f"{study}-{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


def study_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- sending --------------------------------------------------------------------------------


def send_until_broken(
    port: int, files: Iterable[Path], acked: set[str], calling_ae: str = "SENDER"
) -> bool:
    """C-STORE ``files`` one by one over one association; add each 0x0000 to ``acked``.

    Returns True if every file was acknowledged, False as soon as the association fails or an
    instance gets a non-success status (the node died or refused): the caller resends the
    files whose SOP Instance UID is not in ``acked``, like a modality would.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    try:
        # pynetdicom drops (without closing) the socket of a refused connection.
        wait_for_port(port, timeout_s=0.5)
    except TimeoutError:
        return False
    assoc = ae.associate("127.0.0.1", port, ae_title="SCPNODE")
    # ... and of an association its peer aborted: keep our own handle to close it.
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if not assoc.is_established:
        if raw is not None:
            raw.close()
        return False
    try:
        for path in files:
            ds = dcmread(path)
            if str(ds.SOPInstanceUID) in acked:
                continue
            try:
                status = assoc.send_c_store(ds)
            except RuntimeError:
                # The node died between two C-STOREs: pynetdicom refuses to send on an
                # association its peer has aborted (raised, not returned as a status).
                return False
            if not status or int(status.Status) != 0x0000:
                return False
            acked.add(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()
        if raw is not None:
            raw.close()
    return True


# -- checks ---------------------------------------------------------------------------------


def _rows(db_url: str, sql: str) -> list[Any]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))
    finally:
        engine.dispose()


def jobs_by_state(db_url: str) -> dict[str, int]:
    return {
        str(state): int(n)
        for state, n in _rows(db_url, "SELECT state, count(*) FROM jobs GROUP BY state")
    }


def settled(db_url: str, studies: int) -> bool:
    """Every one of ``studies`` studies settled and no job is queued, running or delivering,
    and no study has arrivals newer than its last settle."""
    unsettled = _rows(
        db_url,
        "SELECT count(*) FROM studies WHERE settled_through IS NULL "
        "OR last_received_at > settled_through",
    )[0][0]
    open_jobs = _rows(
        db_url,
        "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running', 'delivering')",
    )[0][0]
    total = _rows(db_url, "SELECT count(*) FROM studies")[0][0]
    return bool(total == studies and unsettled == 0 and open_jobs == 0)


def seg_uids_by_study(pacs: PacsStub) -> dict[str, set[str]]:
    """Distinct SEG SOP Instance UIDs the PACS holds, per referenced study."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in pacs.files():
        ds = dcmread(path, stop_before_pixels=True)
        found[str(ds.StudyInstanceUID)].add(str(ds.SOPInstanceUID))
    return dict(found)


def check_exactly_once(
    db_url: str, acked: set[str], studies: set[str], pacs: PacsStub, context: str
) -> None:
    """The invariants of the fault and scale-out tests, with ``context`` (seed, trial) in every
    failure message.

    - every acknowledged instance has a row whose file exists and parses;
    - every study has exactly one SEG SOP Instance UID at the PACS;
    - no job is running or delivering, no lease is held, every job is done.
    """
    rows = _rows(db_url, "SELECT sop_instance_uid, path FROM instances")
    paths = {str(uid): Path(str(path)) for uid, path in rows}
    missing = acked - set(paths)
    assert not missing, f"{context}: {len(missing)} acknowledged instances not in the table"
    for uid in acked:
        ds = dcmread(paths[uid], stop_before_pixels=True)
        assert str(ds.SOPInstanceUID) == uid, f"{context}: spool file of {uid} is another one"
    segs = seg_uids_by_study(pacs)
    for study in studies:
        assert len(segs.get(study, set())) == 1, (
            f"{context}: study {study} has {len(segs.get(study, set()))} SEGs at the PACS"
        )
    assert set(segs) <= studies, f"{context}: SEGs for unknown studies"
    held = _rows(
        db_url,
        "SELECT id, state, owner FROM jobs WHERE lease_token IS NOT NULL OR state NOT IN ('done')",
    )
    assert held == [], f"{context}: jobs not done or still leased: {held}"
    leased = _rows(
        db_url,
        "SELECT id, state, owner FROM deliveries WHERE lease_token IS NOT NULL OR state != 'done'",
    )
    assert leased == [], f"{context}: deliveries not done or still leased: {leased}"
