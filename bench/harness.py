"""What the benchmarks share: loopback ports, a node config, realistic CT studies, a PACS
stand-in and the exactly-once check.

Benchmarks run on an installed node (``make install``, no test dependencies), so this module
needs only the node's own dependencies and never imports ``tests/``. The tests keep their own
harness (``tests/support/``) with assertions and fixtures.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage, Verification
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]


# -- loopback -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 60.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


# -- the node under test --------------------------------------------------------------------


def write_config(root: Path, port: int, pacs_port: int, **sections: dict[str, Any]) -> Path:
    """``root/config.toml`` for a benchmarked node: paths under ``root``, SQLite, CPU, the
    shipped ct-abdomen model, one destination (AE ``PACS`` at ``pacs_port``); ``sections``
    override keys per section."""
    values: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "SCPNODE", "host": "127.0.0.1", "port": port},
        "storage": {"spool_dir": str(root / "spool"), "min_free_bytes": 0},
        "database": {"url": f"sqlite:///{root / 'node.db'}"},
        "settle": {"quiet_s": 1.0, "poll_s": 0.2},
        "worker": {
            "device": "cpu",
            "model": "ct-abdomen",
            "models_dir": str(REPO / "models"),
            "outbox_dir": str(root / "outbox"),
            "lease_s": 30,
            "heartbeat_s": 2,
            "poll_s": 0.2,
            "threads": 1,
        },
        "retry": {"max_attempts": 3, "initial_backoff_s": 0.5, "max_backoff_s": 1.0},
        "log": {"level": "INFO", "dir": str(root / "log")},
        "web": {"host": "127.0.0.1", "port": free_port()},
    }
    for name, overrides in sections.items():
        values.setdefault(name, {}).update(overrides)
    lines: list[str] = []
    for section, items in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in items.items())
        lines.append("")
    destination = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
    lines.append("[[destinations]]")
    lines.extend(f"{key} = {json.dumps(value)}" for key, value in destination.items())
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


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


# -- the PACS -------------------------------------------------------------------------------


class PacsStub:
    """A pynetdicom Storage SCP standing in for the PACS: keeps every SEG it gets under
    ``directory`` (named by SOP Instance UID) and counts receipts per UID."""

    def __init__(self, directory: Path, port: int, ae_title: str = "PACS") -> None:
        self.directory = directory
        self.port = port
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(Verification)
        self._ae.add_supported_context(
            SegmentationStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        directory.mkdir(parents=True, exist_ok=True)

    def _on_store(self, event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        (self.directory / f"{sop_uid}.dcm").write_bytes(event.encoded_dataset())
        with self._lock:
            self.received[sop_uid] += 1
        return 0x0000

    def start(self) -> PacsStub:
        self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        self._ae.shutdown()

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.dcm"))


# -- checks ---------------------------------------------------------------------------------


def _rows(db_url: str, sql: str) -> list[Any]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql)))
    finally:
        engine.dispose()


def exactly_once_failures(
    db_url: str, sent: set[str], studies: set[str], pacs: PacsStub
) -> list[str]:
    """What breaks "nothing lost, nothing twice" after a run, one line each (empty: none).

    Every sent instance has a row whose spool file holds it; every study has exactly one SEG
    SOP Instance UID at the PACS; every job and delivery is done and holds no lease.
    """
    failures: list[str] = []
    rows = _rows(db_url, "SELECT sop_instance_uid, path FROM instances")
    paths = {str(uid): Path(str(path)) for uid, path in rows}
    missing = sent - set(paths)
    if missing:
        failures.append(f"{len(missing)} sent instances not in the table")
    for uid in sent & set(paths):
        if str(dcmread(paths[uid], stop_before_pixels=True).SOPInstanceUID) != uid:
            failures.append(f"spool file of {uid} holds another instance")
    segs: dict[str, set[str]] = defaultdict(set)
    for path in pacs.files():
        ds = dcmread(path, stop_before_pixels=True)
        segs[str(ds.StudyInstanceUID)].add(str(ds.SOPInstanceUID))
    failures += [
        f"study {study} has {len(segs.get(study, set()))} SEGs at the PACS"
        for study in sorted(studies)
        if len(segs.get(study, set())) != 1
    ]
    if set(segs) - studies:
        failures.append(f"SEGs for unknown studies: {sorted(set(segs) - studies)}")
    for table in ("jobs", "deliveries"):
        held = _rows(
            db_url,
            f"SELECT id, state, owner FROM {table} WHERE lease_token IS NOT NULL "
            "OR state != 'done'",
        )
        if held:
            failures.append(f"{table} not done or still leased: {held}")
    return failures
