"""Client associations: the one way this node opens them.

Every association we request (C-STORE, C-FIND, C-ECHO) goes through :func:`association`:
Nagle off, one timeout for connect/ACSE/DIMSE/network, TLS when given a context from
:mod:`scp_node.dicom.tls`, and the socket closed however the association ends (pynetdicom
leaves the socket of a refused connection to the garbage collector).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.transport import AddressInformation, AssociationSocket

from scp_node.errors import DeliveryError, SopClassRefusedError

__all__ = ["MAX_CONTEXTS", "Peer", "association", "set_tcp_nodelay"]

logger = logging.getLogger(__name__)

#: Presentation contexts one association may propose (PS3.8: odd IDs 1-255).
MAX_CONTEXTS = 128

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


def set_tcp_nodelay(event: Event) -> None:
    """EVT_CONN_OPEN: turn Nagle off; with it on each small PDU waits ~40 ms for an ACK."""
    try:
        assoc_socket = event.assoc.dul.socket
        sock = assoc_socket.socket if assoc_socket is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        logger.warning("could not set TCP_NODELAY", exc_info=True)


class _RecordingContext:
    """Wraps sockets with a real SSLContext and keeps a handle on each wrapped socket."""

    def __init__(self, context: ssl.SSLContext, sockets: list[socket.socket]) -> None:
        self._context = context
        self._sockets = sockets

    def wrap_socket(self, sock: socket.socket, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = self._context.wrap_socket(sock, **kwargs)
        self._sockets.append(wrapped)
        return wrapped


class _ClosingAE(AE):
    """An AE that keeps a handle on every socket of the associations it requests.

    pynetdicom drops its reference to the socket of a connection the peer refused without
    closing it: the garbage collector closes it later (with a ResourceWarning), and a
    dispatcher retrying a dead destination would hold a descriptor per attempt until then.
    Our own handles let :func:`association` close each socket, plain or TLS, however the
    association ends (refused, rejected, aborted, released).
    """

    def __init__(self, ae_title: str) -> None:
        super().__init__(ae_title=ae_title)
        self.sockets: list[socket.socket] = []

    def _create_socket(
        self,
        assoc: Association,
        address: AddressInformation,
        tls_args: tuple[ssl.SSLContext, str] | None,
    ) -> AssociationSocket:
        if tls_args is not None:
            # pynetdicom wraps the socket while connecting, detaching the one created here.
            recording = cast(ssl.SSLContext, _RecordingContext(tls_args[0], self.sockets))
            tls_args = (recording, tls_args[1])
        created = super()._create_socket(assoc, address, tls_args)
        if created.socket is not None:
            self.sockets.append(created.socket)
        return created


def _sop_class_name(uid: UID | None) -> str:
    return "?" if uid is None else str(uid.name)


@contextmanager
def association(
    peer: Peer,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    calling_ae: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[Association]:
    """An established association with ``peer``, released (and its socket closed) on exit.

    Parameters
    ----------
    peer : Peer
        Called AE title, host and port.
    contexts : sequence of (abstract syntax, transfer syntaxes)
        One requested presentation context per entry, in order.
    calling_ae : str
        Our AE title.
    timeout_s : float
        Connect, ACSE, DIMSE and network timeout, in seconds.
    ssl_context : ssl.SSLContext or None
        Run the association over TLS (see :func:`scp_node.dicom.tls.client_context`); the
        peer's certificate is checked against ``peer.host``.

    Yields
    ------
    pynetdicom.association.Association
        Established; it may be lost (aborted, timed out) while in use.

    Raises
    ------
    DeliveryError
        More than :data:`MAX_CONTEXTS` contexts, or the association was not established
        (connection refused, unreachable, association rejected, TLS handshake failed).
        :class:`~scp_node.errors.SopClassRefusedError` when the peer accepted none of the
        proposed SOP classes.
    """
    if not contexts:
        raise DeliveryError("no presentation context to propose")
    if len(contexts) > MAX_CONTEXTS:
        raise DeliveryError(
            f"{len(contexts)} presentation contexts in one association (at most {MAX_CONTEXTS})"
        )
    ae = _ClosingAE(calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for abstract_syntax, transfer_syntaxes in contexts:
        ae.add_requested_context(abstract_syntax, list(transfer_syntaxes))
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        tls_args=(ssl_context, peer.host) if ssl_context is not None else None,
    )
    try:
        if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
            # The peer answered, but takes none of these SOP classes (pynetdicom aborts).
            names = sorted(
                {_sop_class_name(context.abstract_syntax) for context in assoc.rejected_contexts}
            )
            raise SopClassRefusedError(
                f"{peer} accepts none of the proposed SOP classes: {', '.join(names)}"
            )
        if not assoc.is_established:
            how = " over TLS" if ssl_context is not None else ""
            raise DeliveryError(
                f"association with {peer}{how} not established "
                "(refused, rejected, unreachable or TLS failed)"
            )
        yield assoc
    finally:
        try:
            if assoc.is_established:
                assoc.release()
        finally:
            for sock in ae.sockets:
                sock.close()
