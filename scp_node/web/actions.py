"""Retry and cancel from the dashboard: token and origin checks, then :class:`JobAdmin`.

An unknown job is answered 404 and a job in the wrong state 409 by the app's exception
handlers (``JobNotFoundError``, ``JobStateError``); nothing is read first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from scp_node.web.context import deps, error, json_response, wants_json
from scp_node.web.security import refusal

__all__ = ["cancel_job", "retry_job"]

logger = logging.getLogger(__name__)

_MAX_FORM_BYTES = 4096


async def _form(request: Request) -> dict[str, str]:
    """The url-encoded form (only ``token`` is read), refused above a few KiB."""
    declared = request.headers.get("Content-Length", "0")
    if not declared.isdigit() or int(declared) > _MAX_FORM_BYTES:
        raise HTTPException(400, "request body too large")
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        raise HTTPException(400, "request body too large")
    parsed = parse_qs(body.decode("utf-8", "replace"))
    return {key: values[-1] for key, values in parsed.items()}


async def _job_action(request: Request, action: str, run: Callable[[int], None]) -> Response:
    job_id: int = request.path_params["job_id"]
    d = deps(request)
    why = refusal(request.headers, await _form(request), d.web)
    if why is not None:
        logger.warning(
            "web request refused", extra={"job_id": job_id, "action": action, "reason": why[1]}
        )
        return error(request, *why)
    await run_in_threadpool(run, job_id)
    logger.info("job %s from the dashboard", action, extra={"job_id": job_id})
    if wants_json(request):
        view = await run_in_threadpool(d.views.get, job_id)
        return json_response({"id": job_id, "state": view.state.value})
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


async def retry_job(request: Request) -> Response:
    """``POST /jobs/<id>/retry``: run a finished job again (or resend its SEG)."""
    return await _job_action(request, "retry", deps(request).admin.retry)


async def cancel_job(request: Request) -> Response:
    """``POST /jobs/<id>/cancel``: cancel a job that has not finished."""
    return await _job_action(request, "cancel", deps(request).admin.cancel)
