"""The dashboard's read-only endpoints: job list and job page, their JSON twins, the SEG
preview and the health page. Plain functions of the request (Starlette runs them in its
thread pool, since the job table is read synchronously)."""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response

from scp_node.output.preview import preview_path_for
from scp_node.queue.models import TERMINAL_STATES, JobState
from scp_node.views import (
    age,
    event_payload,
    job_rows,
    measurement_rows,
    seg_version,
    series_summaries,
    stage_durations,
    timeline,
)
from scp_node.web.context import deps, json_response, page
from scp_node.web.health import check_health

__all__ = [
    "PAGE_SIZE",
    "api_job",
    "api_jobs",
    "health_page",
    "healthz",
    "job_page",
    "jobs_page",
    "preview",
    "root",
]

PAGE_SIZE = 25
#: Every event of one job (a job has tens, a pathological one hundreds).
_ALL_EVENTS = 10_000


def _state_filter(request: Request) -> JobState | None:
    raw = request.query_params.get("state", "")
    if not raw:
        return None
    try:
        return JobState(raw)
    except ValueError:
        raise HTTPException(400, f"unknown state {raw!r}") from None


def _page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise HTTPException(400, "page must be a positive integer")
    return int(raw)


def root(request: Request) -> Response:
    """``/``: the job list."""
    return RedirectResponse("/jobs", status_code=303)


def jobs_page(request: Request) -> Response:
    """``/jobs?state=&page=``: jobs newest first, filtered by state, paged."""
    state, number = _state_filter(request), _page_number(request)
    d = deps(request)
    found = d.views.list(state=state, limit=PAGE_SIZE + 1, offset=(number - 1) * PAGE_SIZE)
    return page(
        request,
        "jobs.html",
        rows=job_rows(d.views, found[:PAGE_SIZE]),
        states=[s.value for s in JobState],
        state=state.value if state else "",
        page=number,
        has_next=len(found) > PAGE_SIZE,
        counts=d.views.counts(),
    )


def _preview_file(seg_path: str | None) -> Path | None:
    path = preview_path_for(Path(seg_path)) if seg_path else None
    return path if path is not None and path.is_file() else None


def job_page(request: Request) -> Response:
    """``/jobs/<id>``: facts, timeline, deliveries, actions, preview and the live log."""
    d = deps(request)
    view = d.views.get(request.path_params["job_id"])
    events = d.views.events_after(0, job_id=view.id, limit=_ALL_EVENTS)
    return page(
        request,
        "job.html",
        job=view,
        summary=series_summaries(d.views, [view])[view.id],
        age=age(view.created_at),
        steps=timeline(view, events),
        events=[event_payload(e) for e in events],
        last_event_id=events[-1].id if events else 0,
        terminal=view.state in TERMINAL_STATES,
        has_preview=_preview_file(view.seg_path) is not None,
        token_needed=d.web.token is not None,
        stages=stage_durations(view),
        measurements=measurement_rows(view),
        supersedes=seg_version(view.supersedes),
        superseded_by=seg_version(view.superseded_by),
    )


def preview(request: Request) -> Response:
    """``/jobs/<id>/preview.png``: the PNG the worker rendered beside the SEG."""
    job_id = request.path_params["job_id"]
    path = _preview_file(deps(request).views.get(job_id).seg_path)
    if path is None:
        raise HTTPException(404, f"job {job_id} has no preview")
    return FileResponse(path, media_type="image/png")


def api_jobs(request: Request) -> Response:
    """``/api/jobs?state=&page=``: the job list as JSON, with each job's series summary."""
    state, number = _state_filter(request), _page_number(request)
    d = deps(request)
    found = d.views.list(state=state, limit=PAGE_SIZE, offset=(number - 1) * PAGE_SIZE)
    summaries = series_summaries(d.views, found)
    return json_response([{**v.to_json(), **summaries[v.id].to_json()} for v in found])


def api_job(request: Request) -> Response:
    """``/api/jobs/<id>``: one job, its series summary and its events as JSON."""
    d = deps(request)
    view = d.views.get(request.path_params["job_id"])
    events = d.views.events_after(0, job_id=view.id, limit=_ALL_EVENTS)
    return json_response(
        {
            **view.to_json(),
            **series_summaries(d.views, [view])[view.id].to_json(),
            "events": [e.to_json() for e in events],
        }
    )


def health_page(request: Request) -> Response:
    """``/health``: checks, job counts, device and running leases."""
    d = deps(request)
    report = check_health(d.views, d.runtime)
    return page(request, "health.html", report=report, workers=report.workers, age=age)


def healthz(request: Request) -> Response:
    """``/healthz``: the health report as JSON; 200 when every check passed, else 503."""
    d = deps(request)
    report = check_health(d.views, d.runtime)
    return json_response(report.to_json(), 200 if report.ok else 503)
