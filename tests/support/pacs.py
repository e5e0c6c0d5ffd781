"""PACS stand-ins with a twist, built on :class:`tests.support.net.PacsStub`: one that speaks
only TLS, and one that aborts the association in the middle of a C-STORE."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage

from tests.support.net import PacsStub


class TlsPacsStub(PacsStub):
    """A PacsStub that accepts only TLS connections (``ssl_context``) and also stores CT
    images (uncompressed or JPEG 2000 lossless, as subject B is sent)."""

    def __init__(self, directory: Path, port: int, ssl_context: ssl.SSLContext) -> None:
        super().__init__(directory, port)
        self.ssl_context = ssl_context
        self._ae.add_supported_context(
            CTImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )

    def start(self) -> TlsPacsStub:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda _e: 0)],
            ssl_context=self.ssl_context,
        )
        return self


class AbortingPacsStub(PacsStub):
    """A PacsStub that aborts the association (A-ABORT, nothing stored, no response) on its
    first ``aborts`` C-STORE requests, then stores normally."""

    def __init__(self, directory: Path, port: int, aborts: int = 1) -> None:
        super().__init__(directory, port)
        self.aborts = aborts
        self.aborted = 0

    def _on_store(self, event: Any) -> int:
        with self._lock:
            abort = self.aborted < self.aborts
            if abort:
                self.aborted += 1
        if abort:
            event.assoc.abort()
            return 0xC000  # never reaches the sender: the association is gone
        return super()._on_store(event)
