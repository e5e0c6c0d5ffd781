"""Serve the dashboard with uvicorn from a thread of the node's process.

The socket is bound here, before uvicorn starts, so a port already in use (or a host that
is not an address of this machine) stops start-up at once with one line, and port 0 tells
the port it picked.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading

import uvicorn
from starlette.applications import Starlette

from scp_node.errors import BindError

__all__ = ["WebServer"]

logger = logging.getLogger(__name__)

#: Seconds uvicorn waits for open requests (live log streams end within one poll) at stop.
_GRACEFUL_S = 5


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; raises BindError with the reason."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise BindError(f"dashboard: cannot resolve web.host {host!r}: {exc}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        reason = "port already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise BindError(
            f"dashboard cannot listen on {host}:{port}: {reason} (set web.host/web.port, "
            "or web.enabled = false)"
        ) from exc
    return sock


class WebServer:
    """``app`` on ``host:port`` (0 picks a free port; see :attr:`port`), served by uvicorn
    in a daemon thread.

    Parameters
    ----------
    app : Starlette
        From :func:`scp_node.web.app.create_app`.
    host, port : str, int
        Where to listen.
    stop : threading.Event
        The app's stop event: set at :meth:`stop` so live log streams end.

    Raises
    ------
    BindError
        The address cannot be bound (port in use, or not an address of this machine).
    """

    def __init__(self, app: Starlette, host: str, port: int, stop: threading.Event) -> None:
        self.host = host
        self._stop = stop
        self._socket = _bind(host, port)
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,  # the node's JSON logging stays in charge
                access_log=False,  # paths carry job ids only, but every poll would be a line
                server_header=False,  # the app names itself
                lifespan="off",
                ws="none",
                timeout_graceful_shutdown=_GRACEFUL_S,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound."""
        return int(self._socket.getsockname()[1])

    def start(self) -> WebServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="web", daemon=True
        )
        self._thread.start()
        logger.info("dashboard listening", extra={"host": self.host, "port": self.port})
        return self

    def stop(self) -> None:
        """End the live streams, stop accepting, finish open requests and close the socket."""
        self._stop.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=_GRACEFUL_S + 5)
            self._thread = None
        self._socket.close()
