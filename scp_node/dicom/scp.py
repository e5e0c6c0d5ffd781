"""The Storage SCP: presentation contexts, handlers bound, start and graceful stop."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from scp_node.dicom.access import SourceAllowList, handle_requested
from scp_node.dicom.handlers import (
    StoreContext,
    handle_echo,
    handle_rejected,
    handle_store,
)
from scp_node.dicom.net import set_tcp_nodelay
from scp_node.dicom.uids import VERIFICATION_SOP_CLASS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceiverStatus:
    """One Storage SCP process as the health page shows it.

    ``connections`` counts the connections it was given (each carries one association);
    ``instances`` and ``refused`` its C-STOREs answered with success and with a refusal;
    all three since the node started, across restarts of that receiver.
    """

    index: int
    pid: int | None
    alive: bool
    restarts: int
    connections: int
    instances: int
    refused: int


#: Accepted as sent and stored without transcoding (uncompressed first: preferred).
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    CTImageStorage,
    EnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    # What archives make when they convert a single-frame series to one multi-frame object.
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
)


def build_storage_ae(
    ae_title: str,
    *,
    allowed_calling_ae: Sequence[str] = (),
    max_pdu_bytes: int = 131072,
    network_timeout_s: float = 60.0,
) -> AE:
    """An AE that accepts Verification and CT/MR image storage in the usual syntaxes."""
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu_bytes
    ae.network_timeout = network_timeout_s
    ae.maximum_associations = 16
    ae.add_supported_context(VERIFICATION_SOP_CLASS)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
    if allowed_calling_ae:
        ae.require_calling_aet = list(allowed_calling_ae)
    return ae


class _HandoffServer(ThreadedAssociationServer):
    """pynetdicom's threaded server without a socket of its own: it serves the connections
    another process accepted and handed over (:meth:`StorageServer.take`)."""

    def server_bind(self) -> None:
        pass  # nothing is bound or listened on: the acceptor owns the port

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:
        # No serve_forever loop runs, so there is none to wait for.
        self.server_close()
        self.ae._servers.remove(self)


class StorageServer:
    """A running Storage SCP; :meth:`stop` stops accepting and lets transfers finish.

    ``ssl_context`` (see :func:`scp_node.dicom.tls.server_context`) makes it accept only
    TLS; ``allowed_source_ips`` (CIDRs) rejects associations from other addresses;
    ``handoff`` makes it listen on nothing and serve the connections given to :meth:`take`
    (a receiver process: see :mod:`scp_node.dicom.receivers`).

    Raises
    ------
    OSError
        The address cannot be bound (in use, or not an address of this host).
    """

    def __init__(
        self,
        ae: AE,
        host: str,
        port: int,
        ctx: StoreContext,
        *,
        ssl_context: ssl.SSLContext | None = None,
        allowed_source_ips: Sequence[str] = (),
        handoff: bool = False,
    ) -> None:
        self._ae = ae
        self._in_flight = ctx.in_flight
        self._counts = ctx.counts
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            (evt.EVT_CONN_OPEN, self._count_connection),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [ctx]),
            (evt.EVT_REJECTED, handle_rejected),
        ]
        allow = SourceAllowList(allowed_source_ips)
        if allow:
            handlers.append((evt.EVT_REQUESTED, handle_requested, [allow]))
        server = ae.make_server(
            (host, port),
            evt_handlers=handlers,
            ssl_context=ssl_context,
            server_class=_HandoffServer if handoff else ThreadedAssociationServer,
        )
        # As AE.start_server(block=False) does, which cannot be given a server class.
        if not handoff:
            threading.Thread(
                target=server.serve_forever, name=f"AcceptorServer@{port}", daemon=True
            ).start()
        ae._servers.append(server)
        self._server = server
        self.host = host
        self.port = port if handoff else int(self._server.server_address[1])
        if handoff:
            return
        logger.info(
            "storage SCP listening",
            extra={
                "ae_title": ae.ae_title,
                "host": host,
                "port": self.port,
                "tls": ssl_context is not None,
            },
        )

    def _count_connection(self, _event: Any) -> None:
        self._counts.add(connections=1)

    def status(self, index: int = 0, *, restarts: int = 0) -> ReceiverStatus:
        """This server as the health page shows it (a receiver in this process)."""
        return ReceiverStatus(
            index=index,
            pid=os.getpid(),
            alive=self._counts.serving,
            restarts=restarts,
            connections=self._counts.connections,
            instances=self._counts.instances,
            refused=self._counts.refused,
        )

    def take(self, conn: socket.socket) -> None:
        """Serve ``conn``, a connection accepted elsewhere, as if this server had accepted
        it (TLS included); its association runs in a thread of its own.

        Raises
        ------
        OSError
            The connection is already closed.
        """
        address = conn.getpeername()
        if self._server.ssl_context is not None:
            conn = self._server.ssl_context.wrap_socket(conn, server_side=True)
        self._server.process_request(conn, address)

    def stop(self, grace_s: float = 30.0) -> None:
        """Close the listening socket, let the instances in flight finish (durable and
        acknowledged, up to ``grace_s``), then abort the open associations: the sender
        resends what it had not yet sent, and a resend replaces its copy."""
        self._counts.serving = False
        self._server.shutdown()
        if not self._in_flight.wait_idle(grace_s):
            logger.warning("stopping with a C-STORE still running after the grace period")
        for assoc in self._server.active_associations:
            assoc.abort()
        self._ae.shutdown()
        logger.info("storage SCP stopped")
