"""TLS contexts for DICOM associations (PS3.15 B.1/B.9 style: TLS 1.2 or newer).

The server context defers the TLS handshake to the association's own thread: pynetdicom
wraps accepted sockets in its accept loop, and a handshake done there would let one silent
client (a port scan, a plain TCP connection) block every later connection.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scp_node.errors import ConfigError

if TYPE_CHECKING:
    from scp_node.settings import TlsSection

__all__ = [
    "client_context",
    "client_context_from_settings",
    "server_context",
    "server_context_from_settings",
]


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server-side sockets handshake on first read, not on accept."""

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False, **kwargs: Any
    ) -> ssl.SSLSocket:
        if server_side:
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side=server_side, **kwargs)


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.cert_file/tls.key_file: cannot load {cert_file}: {exc}") from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls.ca_file: cannot load {ca_file}: {exc}") from exc


def server_context(
    cert_file: Path,
    key_file: Path,
    *,
    ca_file: Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """A context for the Storage SCP.

    Parameters
    ----------
    cert_file, key_file : Path
        This node's PEM certificate (chain) and its unencrypted private key.
    ca_file : Path or None
        PEM CAs whose client certificates are trusted (checked when a client sends one).
    require_client_cert : bool
        Refuse clients without a certificate signed by ``ca_file``.

    Returns
    -------
    ssl.SSLContext
        TLS 1.2+; handshakes happen in the association's thread.

    Raises
    ------
    ConfigError
        A file is missing or unreadable, or ``require_client_cert`` without ``ca_file``.
    """
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert_file, key_file)
    if ca_file is not None:
        _load_ca(context, ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    if require_client_cert:
        if ca_file is None:
            raise ConfigError("tls.ca_file: required with tls.require_client_cert")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A context for our SCU (``send_files``, ``echo``, the dispatcher).

    Parameters
    ----------
    ca_file : Path or None
        PEM CAs that sign the peers' certificates; None uses the system's CAs.
    cert_file, key_file : Path or None
        Our client certificate and key, presented when the peer asks for one.
    check_hostname : bool
        The peer's certificate must name the host we connect to.

    Returns
    -------
    ssl.SSLContext
        TLS 1.2+, the peer's certificate always verified.

    Raises
    ------
    ConfigError
        A file is missing or unreadable.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if ca_file is not None:
        _load_ca(context, ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        _load_chain(context, cert_file, key_file)
    return context


def server_context_from_settings(section: TlsSection) -> ssl.SSLContext | None:
    """The SCP's context for ``[tls]``, or None when ``tls.enabled`` is false.

    Raises
    ------
    ConfigError
        A file named in ``[tls]`` is missing or unreadable.
    """
    if not section.enabled:
        return None
    assert section.cert_file is not None and section.key_file is not None  # validated
    return server_context(
        section.cert_file,
        section.key_file,
        ca_file=section.ca_file,
        require_client_cert=section.require_client_cert,
    )


def client_context_from_settings(section: TlsSection) -> ssl.SSLContext:
    """Our SCU's context for ``[tls]`` (used for destinations with ``tls = true``).

    Raises
    ------
    ConfigError
        A file named in ``[tls]`` is missing or unreadable.
    """
    return client_context(
        ca_file=section.ca_file,
        cert_file=section.cert_file,
        key_file=section.key_file,
        check_hostname=section.check_hostname,
    )
