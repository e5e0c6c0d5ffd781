"""Who may change jobs from the dashboard, and the headers every response carries."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from http import HTTPStatus
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scp_node import __version__
from scp_node.settings import WebSection

__all__ = ["CSP", "SecurityHeaders", "is_loopback", "refusal"]

#: Nothing is fetched from anywhere but the node itself; no inline script or style.
CSP = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'"
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CSP,
    "Server": f"scp-node/{__version__}",
}


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refusal(
    headers: Mapping[str, str], form: Mapping[str, str], web: WebSection
) -> tuple[HTTPStatus, str] | None:
    """Why a mutating request is refused, or None when it may go ahead.

    A foreign ``Origin`` is refused. Without ``web.token`` only a dashboard bound to loopback
    accepts mutations; with it, the token must come as ``Authorization: Bearer`` or as the
    form's ``token`` field (compared in constant time).
    """
    origin = headers.get("Origin")
    host = headers.get("Host", "")
    if origin and origin != "null" and urlsplit(origin).netloc != host:
        return HTTPStatus.FORBIDDEN, "cross-origin request refused"
    token = web.token
    if token is None:
        if is_loopback(web.host):
            return None
        return (
            HTTPStatus.FORBIDDEN,
            "web.token is not set: retry and cancel are refused while the dashboard is "
            f"bound to {web.host}",
        )
    auth = headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else form.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return HTTPStatus.UNAUTHORIZED, "missing or wrong admin token"
    return None


class SecurityHeaders:
    """ASGI middleware: no caching, no sniffing, the CSP, and our ``Server`` name on every
    response (a header the endpoint set itself wins)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; add the headers to the response's start message."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in _HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
