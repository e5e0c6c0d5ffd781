"""A local OAuth2 token endpoint in front of a DICOMweb service that checks bearer tokens.

Orthanc 1.10 (Debian) checks only HTTP basic credentials; bearer tokens need its
authorization plugin, which Debian does not package. So the tests put this small gateway in
front of an anonymous Orthanc, as Keycloak plus a gateway sit in front of an archive in a
hospital: ``POST /token`` issues client-credentials tokens (client authenticated by HTTP
Basic or in the form), and every other request is forwarded to Orthanc only with a valid,
unexpired bearer token (401 otherwise). Token lifetimes follow a clock the test moves by
hand, the same one the node's token cache reads, so expiry needs no sleeping. It listens on
a free loopback port, over TLS when given a certificate.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.net import free_port


class Ticker:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class TokenGateway:
    """Token endpoint + bearer-checking reverse proxy to ``upstream`` (an Orthanc REST root)."""

    upstream: str
    client_id: str
    client_secret: str
    clock: Callable[[], float]
    #: ``expires_in`` of issued tokens.
    expires_in_s: int = 300
    #: Tokens accepted without being issued here (a static bearer token).
    static_tokens: frozenset[str] = frozenset()
    #: PEM certificate and key: serve HTTPS instead of HTTP.
    tls: tuple[Path, Path] | None = None
    port: int = field(default_factory=free_port)
    #: Refuse every bearer token, even fresh ones (a client lacking a role).
    reject_all: bool = False
    #: Issued tokens, oldest first, and their expiry on ``clock``.
    issued: dict[str, float] = field(default_factory=dict)
    #: How each token request authenticated its client ("basic" or "body"), and its scope.
    client_auths: list[str] = field(default_factory=list)
    scopes: list[str | None] = field(default_factory=list)
    #: Requests answered 401 for a missing, unknown or expired token; requests forwarded.
    refused: int = 0
    forwarded: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> TokenGateway:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, name="token-gateway", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def revoke_all(self) -> None:
        """Invalidate every issued token before its expiry (as a key rotation does)."""
        with self._lock:
            self.issued = dict.fromkeys(self.issued, -1.0)

    def issue(self, client: str, secret: str, how: str, scope: str | None) -> str | None:
        """A new token for valid client credentials, else None."""
        ok = secrets.compare_digest(client, self.client_id) and secrets.compare_digest(
            secret, self.client_secret
        )
        with self._lock:
            self.client_auths.append(how)
            self.scopes.append(scope)
            if not ok:
                return None
            token = secrets.token_urlsafe(24)
            self.issued[token] = self.clock() + self.expires_in_s
            return token

    def accepts(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            fresh = self.issued.get(token, -1.0) > self.clock() or token in self.static_tokens
            ok = scheme.lower() == "bearer" and fresh and not self.reject_all
            if ok:
                self.forwarded += 1
            else:
                self.refused += 1
            return ok


def _handler(gateway: TokenGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: pytest would show every request."""

        def _body(self) -> bytes:
            # Read the whole body before answering, also for a 401, so the client's
            # connection stays in step.
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    chunk = self.rfile.read(size + 2)[:size]
                    if size == 0:
                        break
                    chunks.append(chunk)
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _answer(
            self, code: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (extra or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, payload: dict[str, Any], **extra: str) -> None:
            self._answer(code, json.dumps(payload).encode(), "application/json", extra)

        def _token(self, body: bytes) -> None:
            form = dict(urllib.parse.parse_qsl(body.decode()))
            if form.get("grant_type") != "client_credentials":
                self._json(400, {"error": "unsupported_grant_type"})
                return
            authorization = self.headers.get("Authorization", "")
            if authorization.startswith("Basic "):
                decoded = base64.b64decode(authorization[6:]).decode()
                client, _, secret = decoded.partition(":")
                how = "basic"
            else:
                client, secret = form.get("client_id", ""), form.get("client_secret", "")
                how = "body"
            token = gateway.issue(client, secret, how, form.get("scope"))
            if token is None:
                self._json(
                    401,
                    {"error": "invalid_client", "error_description": "bad client credentials"},
                    **{"WWW-Authenticate": "Basic"},
                )
                return
            self._json(
                200,
                {"access_token": token, "token_type": "Bearer", "expires_in": gateway.expires_in_s},
            )

        def _forward(self, body: bytes) -> None:
            if not gateway.accepts(self.headers.get("Authorization", "")):
                self._answer(
                    401, b"", "text/plain", {"WWW-Authenticate": 'Bearer error="invalid_token"'}
                )
                return
            request = urllib.request.Request(
                gateway.upstream + self.path, data=body or None, method=self.command
            )
            for name in ("Content-Type", "Accept"):
                if name in self.headers:
                    request.add_header(name, self.headers[name])
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    code, answer = response.status, response.read()
                    content_type = response.headers.get("Content-Type", "application/octet-stream")
            except urllib.error.HTTPError as exc:
                code, answer = exc.code, exc.read()
                content_type = exc.headers.get("Content-Type", "text/plain")
            self._answer(code, answer, content_type)

        def do_POST(self) -> None:
            body = self._body()
            if self.path == "/token":
                self._token(body)
            else:
                self._forward(body)

        def do_GET(self) -> None:
            self._forward(b"")

    return Handler
