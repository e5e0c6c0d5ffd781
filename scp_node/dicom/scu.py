"""Storage SCU: send DICOM files to a destination and report a status per file."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pynetdicom._config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp_node.dicom.net import Peer, association
from scp_node.dicom.status import is_success
from scp_node.dicom.uids import VERIFICATION_SOP_CLASS
from scp_node.errors import DeliveryError

# Peer is defined in net; callers of the SCU keep importing it from here.
__all__ = ["Peer", "SendResult", "echo", "send_files"]

logger = logging.getLogger(__name__)

# Send files as they are on disk (no decode, no re-encode): faster, and a SEG or an image
# reaches the peer byte for byte as we stored it.
pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True


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
    syntaxes_of: dict[str, set[str]] = {}
    for sop_class, _sop, syntax in headers:
        syntaxes_of.setdefault(sop_class, {ExplicitVRLittleEndian, ImplicitVRLittleEndian}).add(
            syntax
        )
    # One presentation context per transfer syntax: with several syntaxes in one context the
    # peer picks one (usually uncompressed) and a compressed file, sent as stored, fits none.
    contexts = [
        (sop_class, [syntax])
        for sop_class, syntaxes in syntaxes_of.items()
        for syntax in sorted(syntaxes)
    ]
    results: list[SendResult] = []
    with association(
        peer, contexts, calling_ae=calling_ae, timeout_s=timeout_s, ssl_context=ssl_context
    ) as assoc:
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        }
        for path, (_cls, sop_uid, _ts) in zip(paths, headers, strict=True):
            if not assoc.is_established:
                results.append(SendResult(path, sop_uid, None, "association lost"))
                continue
            try:
                status_ds = assoc.send_c_store(_as_accepted(path, _cls, _ts, accepted))
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
    return results


def _as_accepted(
    path: Path, sop_class: str, syntax: str, accepted: set[tuple[str, str]]
) -> Path | Dataset:
    """The file as it is when the peer took its transfer syntax; decoded when the peer took
    only uncompressed ones for its SOP class (a LABELMAP SEG is stored JPEG-LS lossless, and
    not every PACS takes JPEG-LS). Otherwise the file as it is: pynetdicom then refuses it
    with the reason."""
    if (sop_class, syntax) in accepted or not UID(syntax).is_compressed:
        return path
    if not accepted & {(sop_class, ExplicitVRLittleEndian), (sop_class, ImplicitVRLittleEndian)}:
        return path
    dataset = dcmread(path)
    dataset.decompress(generate_instance_uid=False)  # the same object, only re-encoded
    return dataset


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
    contexts = [(VERIFICATION_SOP_CLASS, [ImplicitVRLittleEndian])]
    with association(
        peer, contexts, calling_ae=calling_ae, timeout_s=timeout_s, ssl_context=ssl_context
    ) as assoc:
        status_ds = assoc.send_c_echo()
    if "Status" not in status_ds:
        raise DeliveryError(f"no C-ECHO response from {peer}")
    return int(status_ds.Status)
