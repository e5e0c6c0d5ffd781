"""Storage SCU: send DICOM files to a destination and report a status per file."""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynetdicom._config
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from scp_node.dicom.handlers import set_tcp_nodelay
from scp_node.dicom.status import is_success
from scp_node.dicom.uids import VERIFICATION_SOP_CLASS
from scp_node.errors import DeliveryError

logger = logging.getLogger(__name__)

# Send files as they are on disk (no decode, no re-encode): faster, and a SEG or an image
# reaches the peer byte for byte as we stored it.
pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Peer:
    """A remote DICOM node: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AE@HOST:PORT``.

        Raises
        ------
        ValueError
            The text is not of that form.
        """
        match = _PEER.match(text.strip())
        if not match:
            raise ValueError(f"expected AE@HOST:PORT, got {text!r}")
        return cls(match["ae"], match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class SendResult:
    """The outcome for one file: the peer's status, or None when it was never sent."""

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and is_success(self.status)


def _header(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return (
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
    )


def _associate(
    calling_ae: str,
    peer: Peer,
    contexts: dict[str, set[str]],
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Any:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    # One presentation context per transfer syntax: with several syntaxes in one context the
    # peer picks one (usually uncompressed) and a compressed file, sent as stored, fits none.
    for sop_class, syntaxes in contexts.items():
        for syntax in sorted(syntaxes):
            ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        tls_args=(ssl_context, peer.host) if ssl_context is not None else None,
    )
    if not assoc.is_established:
        # pynetdicom leaves the socket of a refused or failed connection open: close it, or a
        # dispatcher retrying an unreachable destination leaks a descriptor per attempt.
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if raw is not None:
            raw.close()
        how = " over TLS" if ssl_context is not None else ""
        raise DeliveryError(
            f"association with {peer}{how} not established (refused, unreachable or TLS failed)"
        )
    return assoc


def send_files(
    paths: Sequence[Path],
    peer: Peer,
    *,
    calling_ae: str = "SCPNODE",
    timeout_s: float = 30.0,
    on_sent: Callable[[SendResult], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> list[SendResult]:
    """C-STORE each file over one association, proposing each file's own transfer syntax
    (plus uncompressed ones, so the peer may pick those for uncompressed files).

    With ``ssl_context`` (see :func:`scp_node.dicom.tls.client_context`) the association
    runs over TLS.

    Raises
    ------
    DeliveryError
        The association could not be established or was lost before any file was sent.
    """
    headers = [_header(path) for path in paths]
    contexts: dict[str, set[str]] = {}
    for sop_class, _sop, syntax in headers:
        contexts.setdefault(sop_class, {ExplicitVRLittleEndian, ImplicitVRLittleEndian}).add(syntax)
    if sum(len(syntaxes) for syntaxes in contexts.values()) > 128:
        raise DeliveryError("more than 128 (SOP class, transfer syntax) pairs in one send")
    assoc = _associate(calling_ae, peer, contexts, timeout_s, ssl_context)
    results: list[SendResult] = []
    try:
        for path, (_cls, sop_uid, _ts) in zip(paths, headers, strict=True):
            if not assoc.is_established:
                results.append(SendResult(path, sop_uid, None, "association lost"))
                continue
            try:
                status_ds = assoc.send_c_store(path)
            except Exception as exc:  # pynetdicom raises ValueError when no context fits
                results.append(SendResult(path, sop_uid, None, str(exc)))
                continue
            if "Status" in status_ds:
                result = SendResult(path, sop_uid, int(status_ds.Status))
            else:
                result = SendResult(path, sop_uid, None, "no response (timeout or abort)")
            results.append(result)
            if on_sent is not None:
                on_sent(result)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def echo(
    peer: Peer,
    *,
    calling_ae: str = "SCPNODE",
    timeout_s: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """C-ECHO ``peer`` (over TLS with ``ssl_context``); returns its status.

    Raises
    ------
    DeliveryError
        The association could not be established.
    """
    assoc = _associate(
        calling_ae, peer, {VERIFICATION_SOP_CLASS: {ImplicitVRLittleEndian}}, timeout_s, ssl_context
    )
    try:
        status_ds = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status_ds:
        raise DeliveryError(f"no C-ECHO response from {peer}")
    return int(status_ds.Status)
