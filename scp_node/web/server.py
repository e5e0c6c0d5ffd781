"""The dashboard's HTTP server: stdlib ``ThreadingHTTPServer`` + Jinja2 templates.

Pages are rendered on the server (no CDN, nothing fetched from outside; one small CSS and
one small script served from the package). Routes:

- ``GET /jobs?state=&page=``: job list, filter by state, paged, auto-refresh;
- ``GET /jobs/<id>``: timeline, deliveries, live log (``GET /jobs/<id>/events``, server-sent
  events from :meth:`JobViews.events_after`), SEG preview (``GET /jobs/<id>/preview.png``);
- ``POST /jobs/<id>/retry`` and ``POST /jobs/<id>/cancel``: token-checked;
- ``GET /health``: node health page; ``GET /healthz``: JSON, 200 or 503;
- ``GET /metrics``: Prometheus text format;
- ``GET /api/jobs`` and ``GET /api/jobs/<id>``: the same data as JSON.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape

from scp_node import __version__
from scp_node.errors import JobNotFoundError, JobStateError, NodeError
from scp_node.metrics import NodeMetrics
from scp_node.output.preview import preview_path_for
from scp_node.queue.admin import JobAdmin
from scp_node.queue.models import STAGE_ORDER, TERMINAL_STATES, JobState
from scp_node.queue.records import JobEventView, JobView
from scp_node.queue.views import JobViews
from scp_node.settings import WebSection
from scp_node.web.health import NodeRuntime, age, check_health

__all__ = [
    "PAGE_SIZE",
    "STAGES",
    "WebContext",
    "WebServer",
    "is_loopback",
    "series_summary",
]

logger = logging.getLogger(__name__)

PAGE_SIZE = 25
#: Stage durations in the order a job goes through them (keys of ``JobView.durations``).
STAGES = STAGE_ORDER
_STATIC = Path(__file__).parent / "static"
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
_MAX_FORM_BYTES = 4096
#: A live log stream ends after this long; EventSource reconnects with Last-Event-ID.
_STREAM_MAX_S = 300.0
_CSP = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'"


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fmt_s(value: float | None) -> str:
    if value is None:
        return ""
    if value < 10:
        return f"{value:.2f}s"
    return f"{value:.1f}s" if value < 100 else f"{value / 60:.1f}m"


@dataclass
class WebContext:
    """What the request handlers need; built once by ``app``.

    Attributes
    ----------
    views : JobViews
        The job table's reads.
    admin : JobAdmin
        Retry and cancel.
    web : WebSection
        ``[web]`` settings (host, token, refresh).
    runtime : NodeRuntime
        What this process runs (for the health page and ``/healthz``).
    metrics : NodeMetrics
        The metrics ``/metrics`` exposes.
    stop : threading.Event
        Set when the server stops; live log streams end.
    """

    views: JobViews
    admin: JobAdmin
    web: WebSection
    runtime: NodeRuntime
    metrics: NodeMetrics
    stop: threading.Event


@dataclass(frozen=True)
class _Step:
    name: str
    reached: bool
    at: str
    duration: str


def series_summary(jobs: JobViews, view: JobView) -> dict[str, Any]:
    """Modality, description and slice count of the job's series (the chosen one, else the
    largest of the study)."""
    infos = jobs.series_info([view.study_instance_uid])[view.study_instance_uid]
    chosen = [i for i in infos if i.series_instance_uid == view.series_instance_uid]
    pick = chosen[0] if chosen else max(infos, key=lambda i: i.instance_count, default=None)
    if pick is None:
        return {"modality": "", "series_description": "", "slices": 0}
    return {
        "modality": pick.modality or "",
        "series_description": pick.series_description or "",
        "slices": pick.instance_count,
    }


def _timeline(view: JobView, events: list[JobEventView]) -> list[_Step]:
    """received -> settled -> claimed -> inferred -> delivered, from the job's events."""

    def first(*stages: str) -> JobEventView | None:
        return next((e for e in events if e.stage in stages and e.state != "cancelled"), None)

    d = view.durations
    settled = first("settled")
    received_at = ""
    if settled is not None:
        at = settled.at - timedelta(seconds=d.get("settle_wait", 0.0))
        received_at = at.strftime("%Y-%m-%d %H:%M:%S")
    claimed = first("claim")
    inferred = next(
        (
            e
            for e in events
            if (e.stage == "inference" and e.duration_s is None) or e.stage == "done"
        ),
        None,
    )
    delivered = next((e for e in events if e.stage == "done"), None) if view.seg_path else None
    work = sum(d.get(k, 0.0) for k in ("select", "load", "inference", "seg"))

    def step(name: str, event: JobEventView | None, duration: float | None) -> _Step:
        return _Step(
            name,
            event is not None,
            event.at.strftime("%Y-%m-%d %H:%M:%S") if event is not None else "",
            _fmt_s(duration) if event is not None else "",
        )

    steps = [
        _Step("received", settled is not None, received_at, _fmt_s(d.get("receive"))),
        step("settled", settled, d.get("settle_wait")),
        step("claimed", claimed, d.get("queue_wait")),
        step("inferred", inferred, work if inferred is not None else None),
    ]
    if view.seg_path is not None or view.outcome is None:
        steps.append(step("delivered", delivered, d.get("delivery")))
    return steps


def _event_payload(event: JobEventView) -> dict[str, Any]:
    payload = event.to_json()
    payload["time"] = event.at.strftime("%H:%M:%S")
    return payload


class _Handler(BaseHTTPRequestHandler):
    """One request; the class attributes are set by :class:`WebServer`."""

    ctx: WebContext
    env: Environment
    server_version = f"scp-node/{__version__}"

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        # Paths carry job ids and UIDs only; never a body.
        logger.debug("http " + format, *args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", _CSP)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _html(self, template: str, status: int = 200, **values: Any) -> None:
        page = self.env.get_template(template).render(
            version=__version__, refresh_s=self.ctx.web.refresh_s, **values
        )
        self._send(status, page.encode(), "text/html; charset=utf-8")

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _error(self, status: HTTPStatus, message: str) -> None:
        if "application/json" in self.headers.get("Accept", ""):
            self._json({"error": message}, status)
        else:
            self._html("error.html", status, code=status, message=message)

    def _route(self, routes: list[tuple[str, Callable[..., None]]]) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            for pattern, handler in routes:
                match = re.fullmatch(pattern, url.path)
                if match:
                    handler(*match.groups())
                    return
            self._error(HTTPStatus.NOT_FOUND, f"no page at {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except NodeError as exc:
            logger.warning("web request failed", extra={"path": url.path, "error": str(exc)})
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except Exception:
            logger.exception("web request failed", extra={"path": url.path})
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the node's log")

    def do_GET(self) -> None:
        """Dispatch a GET to its page."""
        self._route(
            [
                (r"/", self._root),
                (r"/jobs", self._jobs_page),
                (r"/jobs/(\d+)", self._job_page),
                (r"/jobs/(\d+)/events", self._job_events),
                (r"/jobs/(\d+)/preview\.png", self._preview),
                (r"/health", self._health_page),
                (r"/healthz", self._healthz),
                (r"/metrics", self._metrics),
                (r"/api/jobs", self._api_jobs),
                (r"/api/jobs/(\d+)", self._api_job),
                (r"/static/([a-z0-9_-]+\.(?:css|js))", self._static),
            ]
        )

    def do_POST(self) -> None:
        """Dispatch a POST (retry/cancel) after the token and origin checks."""
        self._route(
            [
                (r"/jobs/(\d+)/retry", lambda job_id: self._job_action(job_id, "retry")),
                (r"/jobs/(\d+)/cancel", lambda job_id: self._job_action(job_id, "cancel")),
            ]
        )

    # -- pages ------------------------------------------------------------------------------

    def _root(self) -> None:
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": "/jobs"})

    def _state_filter(self) -> JobState | None:
        raw = self.query.get("state", "")
        if not raw:
            return None
        try:
            return JobState(raw)
        except ValueError:
            raise _BadRequest(f"unknown state {raw!r}") from None

    def _page_number(self) -> int:
        raw = self.query.get("page", "1")
        if not raw.isdigit() or int(raw) < 1:
            raise _BadRequest("page must be a positive integer")
        return int(raw)

    def _rows(self, views: list[JobView]) -> list[dict[str, Any]]:
        rows = []
        for view in views:
            rows.append(
                {
                    "job": view,
                    "age": age(view.created_at),
                    "stages": [
                        (s, _fmt_s(view.durations[s])) for s in STAGES if s in view.durations
                    ],
                    **series_summary(self.ctx.views, view),
                }
            )
        return rows

    def _find(self, job_id: int) -> JobView | None:
        try:
            return self.ctx.views.get(job_id)
        except JobNotFoundError:
            return None

    def _jobs_page(self) -> None:
        try:
            state, page = self._state_filter(), self._page_number()
        except _BadRequest as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        views = self.ctx.views.list(state=state, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE)
        self._html(
            "jobs.html",
            rows=self._rows(views[:PAGE_SIZE]),
            states=[s.value for s in JobState],
            state=state.value if state else "",
            page=page,
            has_next=len(views) > PAGE_SIZE,
            counts=self.ctx.views.counts(),
        )

    def _job_page(self, job_id: str) -> None:
        view = self._find(int(job_id))
        if view is None:
            self._error(HTTPStatus.NOT_FOUND, f"no job {job_id}")
            return
        events = self.ctx.views.events_after(0, job_id=view.id, limit=10_000)
        has_preview = view.seg_path is not None and preview_path_for(Path(view.seg_path)).is_file()
        self._html(
            "job.html",
            job=view,
            summary=series_summary(self.ctx.views, view),
            age=age(view.created_at),
            steps=_timeline(view, events),
            events=[_event_payload(e) for e in events],
            last_event_id=events[-1].id if events else 0,
            terminal=view.state in TERMINAL_STATES,
            has_preview=has_preview,
            token_needed=self.ctx.web.token is not None,
            stages=[(s, _fmt_s(view.durations[s])) for s in STAGES if s in view.durations],
        )

    def _job_events(self, job_id: str) -> None:
        """Server-sent events: the job's events after ``Last-Event-ID`` (or ``?after=``)."""
        raw = self.headers.get("Last-Event-ID") or self.query.get("after", "0")
        last = int(raw) if raw.isdigit() else 0
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(b"retry: 2000\n\n")
        self.wfile.flush()
        waited = quiet = 0.0
        while not self.ctx.stop.is_set() and waited < _STREAM_MAX_S:
            events = self.ctx.views.events_after(last, job_id=int(job_id))
            for event in events:
                last = event.id
                data = json.dumps(_event_payload(event))
                self.wfile.write(f"id: {event.id}\nevent: job\ndata: {data}\n\n".encode())
            if events:
                quiet = 0.0
            elif quiet >= 15.0:
                self.wfile.write(b": keep-alive\n\n")
                quiet = 0.0
            self.wfile.flush()
            if not events:
                self.ctx.stop.wait(0.5)
                waited += 0.5
                quiet += 0.5

    def _preview(self, job_id: str) -> None:
        view = self._find(int(job_id))
        path = preview_path_for(Path(view.seg_path)) if view and view.seg_path else None
        if path is None or not path.is_file():
            self._error(HTTPStatus.NOT_FOUND, f"job {job_id} has no preview")
            return
        self._send(HTTPStatus.OK, path.read_bytes(), "image/png")

    def _health_page(self) -> None:
        report = check_health(self.ctx.views, self.ctx.runtime)
        self._html("health.html", report=report, workers=report.workers, age=age)

    def _healthz(self) -> None:
        report = check_health(self.ctx.views, self.ctx.runtime)
        self._json(report.to_json(), HTTPStatus.OK if report.ok else HTTPStatus.SERVICE_UNAVAILABLE)

    def _metrics(self) -> None:
        self.ctx.metrics.refresh(self.ctx.views)
        self._send(
            HTTPStatus.OK,
            self.ctx.metrics.exposition(),
            "text/plain; version=0.0.4; charset=utf-8",
        )

    def _api_jobs(self) -> None:
        try:
            state, page = self._state_filter(), self._page_number()
        except _BadRequest as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        views = self.ctx.views.list(state=state, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        self._json([{**v.to_json(), **series_summary(self.ctx.views, v)} for v in views])

    def _api_job(self, job_id: str) -> None:
        view = self._find(int(job_id))
        if view is None:
            self._json({"error": f"no job {job_id}"}, HTTPStatus.NOT_FOUND)
            return
        events = self.ctx.views.events_after(0, job_id=view.id, limit=10_000)
        self._json(
            {
                **view.to_json(),
                **series_summary(self.ctx.views, view),
                "events": [e.to_json() for e in events],
            }
        )

    def _static(self, name: str) -> None:
        path = _STATIC / name
        if not path.is_file():
            self._error(HTTPStatus.NOT_FOUND, f"no static file {name}")
            return
        self._send(HTTPStatus.OK, path.read_bytes(), _STATIC_TYPES[path.suffix])

    # -- mutations --------------------------------------------------------------------------

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_FORM_BYTES:
            raise _BadRequest("request body too large")
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        return {k: v[-1] for k, v in parse_qs(body).items()}

    def _refusal(self, form: dict[str, str]) -> tuple[HTTPStatus, str] | None:
        """Why this mutating request is refused, or None when it may go ahead."""
        origin = self.headers.get("Origin")
        host = self.headers.get("Host", "")
        if origin and origin != "null" and urlsplit(origin).netloc != host:
            return HTTPStatus.FORBIDDEN, "cross-origin request refused"
        token = self.ctx.web.token
        if token is None:
            if is_loopback(self.ctx.web.host):
                return None
            return (
                HTTPStatus.FORBIDDEN,
                "web.token is not set: retry and cancel are refused while the dashboard is "
                f"bound to {self.ctx.web.host}",
            )
        auth = self.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else form.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            return HTTPStatus.UNAUTHORIZED, "missing or wrong admin token"
        return None

    def _job_action(self, job_id: str, action: str) -> None:
        try:
            form = self._form()
        except _BadRequest as exc:
            self._error(HTTPStatus.BAD_REQUEST, str(exc))
            return
        refusal = self._refusal(form)
        if refusal is not None:
            logger.warning(
                "web request refused",
                extra={"job_id": int(job_id), "action": action, "reason": refusal[1]},
            )
            self._error(*refusal)
            return
        try:
            if action == "retry":
                self.ctx.admin.retry(int(job_id))
            else:
                self.ctx.admin.cancel(int(job_id))
        except JobNotFoundError:
            self._error(HTTPStatus.NOT_FOUND, f"no job {job_id}")
            return
        except JobStateError as exc:
            self._error(HTTPStatus.CONFLICT, str(exc))
            return
        logger.info("job %s from the dashboard", action, extra={"job_id": int(job_id)})
        if "application/json" in self.headers.get("Accept", ""):
            view = self._find(int(job_id))
            self._json({"id": int(job_id), "state": view.state.value if view else None})
        else:
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": f"/jobs/{job_id}"})


class _BadRequest(Exception):
    """A query or form value that cannot be used; answered with 400."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class WebServer:
    """The dashboard on ``host:port``, served from a background thread.

    Parameters
    ----------
    ctx : WebContext
        Job store, settings, runtime and metrics.

    The address is ``ctx.web.host`` and ``ctx.web.port`` (0 picks a free port; see
    :attr:`port`).

    Raises
    ------
    OSError
        The address cannot be bound (in use, or not an address of this machine).
    """

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        env = Environment(
            loader=PackageLoader("scp_node.web"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        handler = type("Handler", (_Handler,), {"ctx": ctx, "env": env})
        self._server = _Server((ctx.web.host, ctx.web.port), handler)
        self._thread: threading.Thread | None = None
        if not is_loopback(ctx.web.host) and ctx.web.token is None:
            logger.warning(
                "dashboard bound to a non-loopback address without web.token: retry and "
                "cancel are refused",
                extra={"host": ctx.web.host},
            )

    @property
    def port(self) -> int:
        """The TCP port actually bound."""
        return int(self._server.server_address[1])

    def start(self) -> WebServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="web",
            daemon=True,
        )
        self._thread.start()
        logger.info("dashboard listening", extra={"host": self.ctx.web.host, "port": self.port})
        return self

    def stop(self) -> None:
        """Stop accepting, end the live streams and close the socket."""
        self.ctx.stop.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()
