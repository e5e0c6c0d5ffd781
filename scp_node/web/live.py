"""The live job log: server-sent events of a job's events as they are written.

An ``EventSource`` reconnects by itself (after ``retry`` ms) with ``Last-Event-ID``, so a
stream ends after :data:`STREAM_MAX_S` and when the server stops, and resumes where it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from scp_node.views import event_payload
from scp_node.web.context import WebDeps, deps

__all__ = ["STREAM_MAX_S", "job_events"]

#: A stream ends after this long; the browser reconnects with Last-Event-ID.
STREAM_MAX_S = 300.0
_POLL_S = 0.5
_KEEP_ALIVE_S = 15.0


async def _stream(d: WebDeps, job_id: int, last_id: int) -> AsyncIterator[bytes]:
    yield b"retry: 2000\n\n"
    started = quiet_since = time.monotonic()
    while not d.stop.is_set() and time.monotonic() - started < STREAM_MAX_S:
        events = await run_in_threadpool(d.views.events_after, last_id, job_id)
        for event in events:
            last_id = event.id
            data = json.dumps(event_payload(event))
            yield f"id: {event.id}\nevent: job\ndata: {data}\n\n".encode()
        now = time.monotonic()
        if events:
            quiet_since = now
            continue
        if now - quiet_since >= _KEEP_ALIVE_S:
            # A comment line keeps proxies from closing an idle stream.
            yield b": keep-alive\n\n"
            quiet_since = now
        await anyio.sleep(_POLL_S)


async def job_events(request: Request) -> Response:
    """``/jobs/<id>/events``: the job's events after ``Last-Event-ID`` (or ``?after=``)."""
    raw = request.headers.get("Last-Event-ID") or request.query_params.get("after", "0")
    last_id = int(raw) if raw.isdigit() else 0
    return StreamingResponse(
        _stream(deps(request), request.path_params["job_id"], last_id),
        # Set as a header so Starlette adds no charset: the media type is exactly this.
        headers={"Content-Type": "text/event-stream"},
    )
