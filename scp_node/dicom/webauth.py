"""HTTP sessions for DICOMweb destinations: credentials and TLS verification.

A destination's ``[destinations.auth]`` becomes a ``requests`` auth object on one session
per destination, kept by the dispatcher (so connections and an OAuth2 token are reused):
HTTP basic, a static bearer token, or an OAuth2 client-credentials token fetched from the
token endpoint, cached, renewed before it expires and once more when the service answers
401. Secrets come from the environment or a file, are read once when the session is built,
and appear in no message, log record or repr.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth

from scp_node.errors import ConfigError, DeliveryError

if TYPE_CHECKING:
    from scp_node.settings import Destination, DestinationAuth, TlsSection

__all__ = [
    "BearerAuth",
    "ClientCredentialsAuth",
    "RenewableAuth",
    "http_error_reason",
    "read_secret",
    "renew_on_unauthorized",
    "web_session",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A token is renewed this long before it expires (at most half its lifetime), so a
#: request never starts with a token about to lapse.
RENEW_MARGIN_S = 30.0

#: An OAuth2 ``error`` code is an ASCII word (RFC 6749 5.2); anything else is not echoed.
_OAUTH_ERROR = re.compile(r"^[\x21-\x7e]{1,64}$")


class _PinnedTlsAdapter(HTTPAdapter):
    """Verifies with the configured CA bundle and client certificate on every request.

    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` replace a session's ``verify``
    (many images set them), so ``tls.ca_file`` is enforced here, where the connection is
    made.
    """

    def __init__(self, verify: bool | str, cert: tuple[str, str] | None) -> None:
        super().__init__()
        self._verify = verify
        self._cert = cert

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        kwargs["verify"] = self._verify
        kwargs["cert"] = self._cert
        return super().send(request, **kwargs)


def _tls_session(verify: bool | str, cert: tuple[str, str] | None) -> requests.Session:
    """A session whose HTTPS connections use ``verify`` and ``cert`` whatever the
    environment says (with ``verify=True`` the default bundle, or the environment's)."""
    session = requests.Session()
    if verify is not True or cert is not None:
        adapter = _PinnedTlsAdapter(verify, cert)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
    return session


@runtime_checkable
class RenewableAuth(Protocol):
    """Credentials that can be fetched anew after the service refused them."""

    def renew(self) -> None:
        """Drop the cached credentials; the next request fetches fresh ones."""


class BearerAuth(AuthBase):
    """``Authorization: Bearer <token>`` with a fixed token."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<token>)"


class ClientCredentialsAuth(AuthBase):
    """An OAuth2 client-credentials access token as ``Authorization: Bearer``.

    The token is fetched on first use and kept until ``RENEW_MARGIN_S`` (at most half its
    lifetime) before its ``expires_in`` runs out; a token without ``expires_in`` is kept
    until :meth:`renew`. Safe to share between threads.

    Parameters
    ----------
    token_url : str
        The token endpoint.
    client_id, client_secret : str
        The client's credentials.
    scope : str or None
        Space-separated scopes to ask for.
    client_auth : {"basic", "body"}
        Send the client credentials as HTTP Basic (RFC 6749 2.3.1) or in the form body.
    verify : bool or str
        TLS verification of the token endpoint (a CA bundle path, or True for the default).
    cert : tuple of str or None
        Client certificate and key presented when the token endpoint asks for one.
    timeout_s : float
        Connect and read timeout of the token request.
    clock : callable
        Monotonic seconds (tests move it by hand).
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        client_auth: str = "basic",
        verify: bool | str = True,
        cert: tuple[str, str] | None = None,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        self._client_auth = client_auth
        self._timeout_s = timeout_s
        self._clock = clock
        # Token requests get their own session: they must never pass through this auth.
        self._session = _tls_session(verify, cert)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._renew_at = -math.inf

    def __repr__(self) -> str:
        return f"ClientCredentialsAuth({self.token_url!r}, client_id={self._client_id!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.access_token()}"
        return request

    def renew(self) -> None:
        """Drop the cached token; the next request fetches a new one."""
        with self._lock:
            self._token = None

    def access_token(self) -> str:
        """The cached token, or a new one when none is cached or it is about to expire.

        Raises
        ------
        DeliveryError
            The token endpoint is unreachable, refused the client (HTTP status and OAuth2
            error code in the message), or answered without a bearer token.
        """
        with self._lock:
            if self._token is None or self._clock() >= self._renew_at:
                self._token, self._renew_at = self._fetch()
            return self._token

    def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if self._scope is not None:
            form["scope"] = self._scope
        auth: HTTPBasicAuth | None = None
        if self._client_auth == "body":
            form |= {"client_id": self._client_id, "client_secret": self._client_secret}
        else:
            auth = HTTPBasicAuth(self._client_id, self._client_secret)
        where = f"OAuth2 token endpoint {self.token_url}"
        started = self._clock()
        try:
            response = self._session.post(
                self.token_url,
                data=form,
                auth=auth,
                headers={"Accept": "application/json"},
                timeout=self._timeout_s,
            )
        except requests.RequestException as exc:
            raise DeliveryError(f"{where} failed: {exc}") from exc
        body = _json_object(response)
        if not response.ok:
            code = body.get("error")
            detail = f" ({code})" if isinstance(code, str) and _OAUTH_ERROR.match(code) else ""
            raise DeliveryError(
                f"{where} answered HTTP {response.status_code} {response.reason}{detail}"
            )
        token = body.get("access_token")
        token_type = str(body.get("token_type", "Bearer"))
        if not isinstance(token, str) or not token or token_type.lower() != "bearer":
            raise DeliveryError(f"{where} answered no bearer access_token")
        renew_at = math.inf
        try:
            lifetime = float(body["expires_in"])
        except (KeyError, TypeError, ValueError):
            lifetime = math.nan
        if math.isfinite(lifetime):
            renew_at = started + lifetime - min(RENEW_MARGIN_S, lifetime / 2)
        logger.info(
            "access token fetched",
            extra={"token_url": self.token_url, "expires_in_s": body.get("expires_in")},
        )
        return token, renew_at


def _json_object(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


#: What an authentication refusal means, said beside the HTTP status.
_AUTH_HINTS = {
    401: " (credentials missing or refused)",
    403: " (credentials not allowed to store here)",
}


def http_error_reason(exc: requests.HTTPError) -> str:
    """``HTTP <code> <reason phrase>`` and a hint for 401/403: never the body, which could
    echo patient data back."""
    if exc.response is None:
        return "HTTP ?"
    code = exc.response.status_code
    return f"HTTP {code} {exc.response.reason}{_AUTH_HINTS.get(code, '')}"


def renew_on_unauthorized(session: requests.Session | None, call: Callable[[], T]) -> T:
    """Run ``call``; when it raises HTTP 401 and the session's credentials can be renewed
    (an OAuth2 token the service no longer accepts), renew them and run it once more.

    Raises
    ------
    requests.HTTPError
        From ``call``: any other HTTP error, or a 401 again after the renewal.
    """
    try:
        return call()
    except requests.HTTPError as exc:
        auth = session.auth if session is not None else None
        status = exc.response.status_code if exc.response is not None else None
        if status != 401 or not isinstance(auth, RenewableAuth):
            raise
        auth.renew()
        logger.info("credentials refused (HTTP 401): renewed, trying once more")
    return call()


def read_secret(
    where: str, name: str, env: str | None, file: Path | None, environ: Mapping[str, str]
) -> str:
    """The secret ``name`` from the environment variable ``env`` or the file ``file``.

    A file's trailing line break is dropped.

    Parameters
    ----------
    where : str
        The configuration path for messages, e.g. ``destinations.pacs.auth``.
    name : str
        The secret's key without suffix (``password``, ``token``, ``client_secret``).
    env, file
        Where it is (exactly one is set; settings validation ensures it).
    environ : Mapping
        The process environment (passed in: no module reads it by itself).

    Raises
    ------
    ConfigError
        The variable is unset or empty, or the file is unreadable or empty; the message
        names the key and the variable or file, never the secret.
    """
    if env is not None:
        value = environ.get(env, "")
        if not value:
            raise ConfigError(f"{where}.{name}_env: environment variable {env} is not set")
        return value
    if file is None:
        raise ConfigError(f"{where}: {name}_env or {name}_file is required")
    try:
        value = file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}.{name}_file: cannot read {file}: {exc}") from exc
    if not value:
        raise ConfigError(f"{where}.{name}_file: {file} is empty")
    return value


def _auth(
    where: str,
    section: DestinationAuth,
    environ: Mapping[str, str],
    verify: bool | str,
    cert: tuple[str, str] | None,
    clock: Callable[[], float],
) -> AuthBase:
    if section.kind == "basic":
        assert section.username is not None  # validated
        password = read_secret(
            where, "password", section.password_env, section.password_file, environ
        )
        return HTTPBasicAuth(section.username, password)
    if section.kind == "bearer":
        return BearerAuth(
            read_secret(where, "token", section.token_env, section.token_file, environ)
        )
    assert section.token_url is not None and section.client_id is not None  # validated
    secret = read_secret(
        where, "client_secret", section.client_secret_env, section.client_secret_file, environ
    )
    return ClientCredentialsAuth(
        section.token_url,
        section.client_id,
        secret,
        scope=section.scope,
        client_auth=section.client_auth,
        verify=verify,
        cert=cert,
        clock=clock,
    )


def _in_clear_off_host(url: str) -> bool:
    """A plain-http URL to a host other than loopback (credentials would cross the wire)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname in (None, "localhost"):
        return False
    try:
        return not ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return True


def web_session(
    destination: Destination,
    tls: TlsSection,
    environ: Mapping[str, str],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> requests.Session:
    """The HTTP session for a ``kind = "dicomweb"`` destination.

    HTTPS certificates are checked against ``tls.ca_file`` (the default CA bundle when
    unset); ``tls.cert_file``/``tls.key_file`` are presented when the server asks for a
    client certificate. ``[destinations.auth]`` sets the credentials.

    Parameters
    ----------
    destination : Destination
        A validated ``[[destinations]]`` entry.
    tls : TlsSection
        The ``[tls]`` files.
    environ : Mapping
        The process environment, for ``*_env`` secrets.
    clock : callable
        Monotonic seconds for OAuth2 token expiry.

    Raises
    ------
    ConfigError
        A secret cannot be read (the message names the key).
    """
    verify: bool | str = str(tls.ca_file) if tls.ca_file is not None else True
    cert = (
        (str(tls.cert_file), str(tls.key_file))
        if tls.cert_file is not None and tls.key_file is not None
        else None
    )
    session = _tls_session(verify, cert)
    section = destination.auth
    if section is not None:
        where = f"destinations.{destination.name}.auth"
        session.auth = _auth(where, section, environ, verify, cert, clock)
        urls = [destination.url or "", section.token_url or ""]
        if any(_in_clear_off_host(url) for url in urls):
            logger.warning(
                "credentials sent over plain http: use https",
                extra={"destination": destination.name},
            )
    return session
