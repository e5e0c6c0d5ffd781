"""The dashboard as a Starlette app, built by one factory from its dependencies.

Routes:

- ``GET /jobs?state=&page=``: job list, filter by state, paged, auto-refresh;
- ``GET /jobs/<id>``: timeline, deliveries, live log (``GET /jobs/<id>/events``, server-sent
  events), SEG preview (``GET /jobs/<id>/preview.png``);
- ``POST /jobs/<id>/retry`` and ``POST /jobs/<id>/cancel``: token-checked;
- ``GET /health``: node health page; ``GET /healthz``: JSON, 200 or 503;
- ``GET /metrics``: Prometheus text format;
- ``GET /api/jobs`` and ``GET /api/jobs/<id>``: the same data as JSON;
- ``GET /static/...``: the one stylesheet and the one script (nothing is fetched elsewhere).
"""

from __future__ import annotations

import logging
import threading
from http import HTTPStatus

from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Receive, Scope, Send

from scp_node.errors import JobNotFoundError, JobStateError, NodeError
from scp_node.metrics import NodeMetrics
from scp_node.queue.admin import JobAdmin
from scp_node.queue.views import JobViews
from scp_node.settings import WebSection
from scp_node.web import actions, live, pages
from scp_node.web.context import WebDeps, error
from scp_node.web.health import NodeRuntime
from scp_node.web.security import SecurityHeaders, is_loopback

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


class _Metrics:
    """``/metrics``: refresh the job-table figures, then prometheus_client's ASGI app."""

    def __init__(self, views: JobViews, metrics: NodeMetrics) -> None:
        self._views = views
        self._metrics = metrics
        self._app = make_asgi_app(metrics.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await run_in_threadpool(self._metrics.refresh, self._views)
        await self._app(scope, receive, send)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404 and message == HTTPStatus.NOT_FOUND.phrase:
        message = f"no page at {request.url.path}"
    return error(request, exc.status_code, message, exc.headers)


def _not_found(request: Request, exc: Exception) -> Response:
    return error(request, 404, str(exc))


def _conflict(request: Request, exc: Exception) -> Response:
    return error(request, 409, str(exc))


def _unavailable(request: Request, exc: Exception) -> Response:
    logger.warning("web request failed", extra={"path": request.url.path, "error": str(exc)})
    return error(request, 503, str(exc))


def _internal(request: Request, exc: Exception) -> Response:
    logger.error("web request failed", exc_info=exc, extra={"path": request.url.path})
    return error(request, 500, "internal error; see the node's log")


def create_app(
    views: JobViews,
    admin: JobAdmin,
    web: WebSection,
    runtime: NodeRuntime,
    metrics: NodeMetrics,
    *,
    stop: threading.Event | None = None,
) -> Starlette:
    """Build the dashboard app.

    Parameters
    ----------
    views : JobViews
        Reads of the job table.
    admin : JobAdmin
        Retry and cancel.
    web : WebSection
        ``[web]`` settings: the bind host decides whether mutations need ``web.token``.
    runtime : NodeRuntime
        What this process runs (health page, ``/healthz``).
    metrics : NodeMetrics
        Exposed at ``/metrics`` (job-table figures refreshed on each scrape).
    stop : threading.Event or None
        Set to end the live log streams (the server sets it when it stops).

    Returns
    -------
    Starlette
        ``JobNotFoundError`` is answered 404, ``JobStateError`` 409, any other
        ``NodeError`` (the database is unreachable) 503; JSON for the API and clients that
        accept it, the error page otherwise.
    """
    env = Environment(
        loader=PackageLoader("scp_node.web"),
        autoescape=select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    app = Starlette(
        routes=[
            Route("/", pages.root),
            Route("/jobs", pages.jobs_page),
            Route("/jobs/{job_id:int}", pages.job_page),
            Route("/jobs/{job_id:int}/events", live.job_events),
            Route("/jobs/{job_id:int}/preview.png", pages.preview),
            Route("/jobs/{job_id:int}/retry", actions.retry_job, methods=["POST"]),
            Route("/jobs/{job_id:int}/cancel", actions.cancel_job, methods=["POST"]),
            Route("/health", pages.health_page),
            Route("/healthz", pages.healthz),
            Route("/metrics", _Metrics(views, metrics)),
            Route("/api/jobs", pages.api_jobs),
            Route("/api/jobs/{job_id:int}", pages.api_job),
            Mount("/static", StaticFiles(packages=[("scp_node.web", "static")]), name="static"),
        ],
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={
            HTTPException: _http_error,
            JobNotFoundError: _not_found,
            JobStateError: _conflict,
            NodeError: _unavailable,
            Exception: _internal,
        },
    )
    app.state.deps = WebDeps(
        views=views,
        admin=admin,
        web=web,
        runtime=runtime,
        metrics=metrics,
        stop=stop or threading.Event(),
        templates=Jinja2Templates(env=env),
    )
    if web.token is None and not is_loopback(web.host):
        logger.warning(
            "dashboard bound to a non-loopback address without web.token: retry and "
            "cancel are refused",
            extra={"host": web.host},
        )
    return app
