"""What every endpoint needs (built once by :func:`scp_node.web.app.create_app`) and the
responses they share: HTML pages, JSON, and errors in the format the client asked for."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from scp_node import __version__
from scp_node.metrics import NodeMetrics
from scp_node.queue.admin import JobAdmin
from scp_node.queue.views import JobViews
from scp_node.settings import WebSection
from scp_node.web.health import NodeRuntime

__all__ = ["WebDeps", "deps", "error", "json_response", "page", "wants_json"]


@dataclass(frozen=True)
class WebDeps:
    """The dashboard's dependencies.

    Attributes
    ----------
    views : JobViews
        Reads of the job table.
    admin : JobAdmin
        Retry and cancel.
    web : WebSection
        ``[web]`` settings (host, token, refresh).
    runtime : NodeRuntime
        What this process runs (for the health page and ``/healthz``).
    metrics : NodeMetrics
        What ``/metrics`` exposes.
    stop : threading.Event
        Set when the server stops; live log streams end.
    templates : Jinja2Templates
        The package's templates.
    """

    views: JobViews
    admin: JobAdmin
    web: WebSection
    runtime: NodeRuntime
    metrics: NodeMetrics
    stop: threading.Event
    templates: Jinja2Templates


def deps(request: Request) -> WebDeps:
    """The dependencies of the app serving ``request``."""
    found: WebDeps = request.app.state.deps
    return found


def wants_json(request: Request) -> bool:
    """True for the JSON API and for clients that ask for JSON."""
    return request.url.path.startswith("/api/") or "application/json" in request.headers.get(
        "Accept", ""
    )


def json_response(
    value: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """``value`` as JSON (``json.dumps`` defaults, as the node has always answered)."""
    return Response(json.dumps(value), status, headers, media_type="application/json")


def page(
    request: Request,
    template: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **values: Any,
) -> Response:
    """Render one of the package's templates."""
    d = deps(request)
    return d.templates.TemplateResponse(
        request,
        template,
        {"version": __version__, "refresh_s": d.web.refresh_s, **values},
        status_code=status,
        headers=headers,
    )


def error(
    request: Request, status: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """An error as ``{"error": message}`` or as the error page, by what the client wants."""
    if wants_json(request):
        return json_response({"error": message}, status, headers)
    return page(request, "error.html", status, headers, code=status, message=message)
