"""Loopback networking helpers for tests: free ports, waiting for a listener, a PACS stand-in."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    LabelMapSegmentationStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    Verification,
)

#: What a PacsStub stores unless told to refuse some: SEG (BINARY and LABELMAP), IOCM
#: rejection notes, TID 1500 SRs, Secondary Capture overlay images.
STUB_SOP_CLASSES = (
    SegmentationStorage,
    LabelMapSegmentationStorage,
    KeyObjectSelectionDocumentStorage,
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 60.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class PacsStub:
    """A real pynetdicom Storage SCP standing in for the PACS: stores every SEG (and IOCM
    rejection note, SR) it gets under ``directory`` (named by SOP Instance UID) and counts
    receipts per UID. SOP classes in ``refuse`` are not offered: their presentation
    contexts are rejected, as a PACS that does not know them does."""

    def __init__(
        self,
        directory: Path,
        port: int,
        ae_title: str = "PACS",
        status: int = 0,
        delay_s: float = 0.0,
        refuse: Collection[str] = (),
    ) -> None:
        self.directory = directory
        self.port = port
        self.status = status
        #: Seconds to wait after storing and before answering (a slow PACS: the sender may
        #: die between our receipt and its acknowledgement).
        self.delay_s = delay_s
        self.received: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(Verification)
        for sop_class in STUB_SOP_CLASSES:
            if sop_class in refuse:
                continue
            self._ae.add_supported_context(
                sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
        self._server: Any = None
        directory.mkdir(parents=True, exist_ok=True)

    def _on_store(self, event: Any) -> int:
        if self.status != 0:
            return self.status
        data = event.encoded_dataset()
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        (self.directory / f"{sop_uid}.dcm").write_bytes(data)
        with self._lock:
            self.received[sop_uid] += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return 0x0000

    def start(self) -> PacsStub:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._ae.shutdown()
            self._server = None

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("*.dcm"))

    def datasets(self) -> list[Any]:
        return [dcmread(path) for path in self.files()]
