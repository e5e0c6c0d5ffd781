"""``scp-node jobs`` (list, show, retry, cancel) and ``scp-node logs``: the job table from a
terminal. What is shown and how it is styled comes from :mod:`scp_node.views`."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from scp_node.cli.common import ConfigOption, console, fail, job_table, on_error
from scp_node.queue.models import Level
from scp_node.views import (
    LEVEL_STYLES,
    STATE_STYLES,
    JobRow,
    format_duration,
    job_rows,
    measurement_rows,
    seg_version,
    stage_durations,
)

if TYPE_CHECKING:
    from scp_node.queue.records import JobEventView

__all__ = ["app", "event_line", "jobs_table", "logs"]

app = typer.Typer(help="Inspect and manage jobs.", invoke_without_command=True)

#: The series description never gets fewer characters than this in the default table.
_MIN_SERIES = 8
#: Every event of one job (a job has tens, a pathological one hundreds).
_ALL_EVENTS = 10_000


def _state(text: str) -> str:
    return f"[{STATE_STYLES.get(text, '')}]{text}[/]"


def _study(uid: str) -> str:
    # The end of a UID is what tells two studies of one site apart.
    return "…" + uid[-12:] if len(uid) > 13 else uid


def jobs_table(rows: list[JobRow], *, width: int, wide: bool = False) -> Table:
    """The job list as a rich table for a terminal ``width`` columns wide.

    The default shows id, state, model, study, series, age and total time, each cell on one
    line and whole, except the series description, which gets what is left (at least a
    few characters) and ends in an ellipsis when longer. ``wide`` adds attempts, study
    date, modality, slices, outcome, the time of every stage and the error, folding the
    long ones.
    """
    table = Table(title="scp-node jobs", header_style="bold", expand=wide)
    if not wide:
        header = ("id", "state", "model", "study", "series", "age", "total")
        cells = [
            (
                str(row.job.id),
                row.job.state.value,
                row.job.model,
                _study(row.job.study_instance_uid),
                row.series.series_description,
                row.age,
                format_duration(row.job.durations.get("total")),
            )
            for row in rows
        ]
        widths = [
            max([cell_len(h), *(cell_len(c[i]) for c in cells)]) for i, h in enumerate(header)
        ]
        # Each column takes its padding and one rule; the table one more rule.
        rest = width - (sum(widths) - widths[4]) - 3 * len(header) - 1
        widths[4] = max(_MIN_SERIES, min(widths[4], rest))
        for i, name in enumerate(header):
            table.add_column(
                name,
                no_wrap=True,
                overflow="ellipsis",
                width=widths[i],
                justify="right" if name in ("age", "total") else "left",
            )
        for values in cells:
            styled = [Text(v) for v in values]
            styled[1].stylize(STATE_STYLES.get(values[1], ""))
            table.add_row(*styled)
        return table
    # Identity columns never shrink; the wide ones fold so the table fits any terminal.
    for column in ("id", "state", "try"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    for column in ("model", "study", "date", "mod", "series", "slices", "age", "outcome"):
        table.add_column(column, overflow="fold", ratio=1)
    for column in ("time per stage", "error"):
        table.add_column(column, overflow="fold", ratio=3 if column == "time per stage" else 1)
    for row in rows:
        job = row.job
        table.add_row(
            str(job.id),
            _state(job.state.value),
            f"{job.attempts}/{job.max_attempts}",
            job.model,
            _study(job.study_instance_uid),
            job.study_date or "",
            row.series.modality,
            escape(row.series.series_description),
            str(row.series.slices),
            row.age,
            str(job.outcome or ""),
            " ".join(f"{stage} {value}" for stage, value in row.stages),
            escape((job.error or "")[:160]),
        )
    return table


@app.callback()
def jobs(
    ctx: typer.Context,
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON list instead of a table.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="Every column (attempts, outcome, stages, error).")
    ] = False,
) -> None:
    """List jobs, newest first (--wide: with the time each stage took)."""
    ctx.obj = config
    if ctx.invoked_subcommand is not None:
        return
    from scp_node.queue.models import JobState

    try:
        wanted = JobState(state) if state else None
    except ValueError as exc:
        raise fail(f"unknown state {state!r}", 2) from exc
    views, _ = job_table(config)
    with on_error():
        found = views.list(state=wanted, limit=limit)
        if as_json:
            sys.stdout.write(json.dumps([v.to_json() for v in found], indent=2) + "\n")
            return
        rows = job_rows(views, found)
    console.print(jobs_table(rows, width=console.width, wide=wide))


@app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: int,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One job: its state, stage durations, deliveries and event history."""
    views, _ = job_table(ctx.obj)
    with on_error():
        view = views.get(job_id)
        events = views.events_after(0, job_id=job_id, limit=_ALL_EVENTS)
    if as_json:
        payload = view.to_json()
        payload["events"] = [e.to_json() for e in events]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    console.print(f"[bold]job {view.id}[/] {_state(view.state.value)}")
    for key, value in view.to_json().items():
        if key not in ("deliveries", "durations", "supersedes", "superseded_by", "measurements"):
            console.print(f"  {key}: {escape(str(value))}")
    if view.supersedes is not None:
        console.print(f"  supersedes: {seg_version(view.supersedes)}")
    if view.superseded_by is not None:
        console.print(f"  superseded by: {seg_version(view.superseded_by)}")
    console.print(
        "  durations: " + ", ".join(f"{name} {value}" for name, value in stage_durations(view))
    )
    for number, label, volume, mean, sd in measurement_rows(view):
        console.print(f"  segment {number} {escape(label)}: volume {volume}, mean {mean}, SD {sd}")
    for d in view.deliveries:
        console.print(
            f"  {_DELIVERY_NAMES.get(d.kind.value, 'delivery')} {d.destination} "
            f"({d.ae_title}@{d.host}:{d.port}): {d.state}, "
            f"{d.attempts} attempt(s)"
            + (f", last error: {escape(d.last_error)}" if d.last_error else "")
        )
    for event in events:
        console.print(event_line(event))


#: How ``jobs show`` names a delivery of each kind (a SEG delivery is plain "delivery").
_DELIVERY_NAMES = {"kos": "rejection note", "sr": "SR delivery", "sc": "SC delivery"}


@app.command("retry")
def jobs_retry(ctx: typer.Context, job_id: int) -> None:
    """Run a failed or cancelled job again (or resend its SEG if only delivery failed)."""
    _, admin = job_table(ctx.obj)
    with on_error():
        admin.retry(job_id)
    console.print(f"job {job_id} requeued")


@app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: int) -> None:
    """Cancel a job that has not finished."""
    _, admin = job_table(ctx.obj)
    with on_error():
        admin.cancel(job_id)
    console.print(f"job {job_id} cancelled")


def event_line(event: JobEventView) -> str:
    """One event as a rich-markup line: local time, level, job, stage, state, message."""
    level = event.level
    style = LEVEL_STYLES[level] if level == Level.ERROR else STATE_STYLES.get(str(event.state), "")
    duration = f" ({format_duration(event.duration_s)})" if event.duration_s is not None else ""
    stamp = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    message = escape(event.message or "")
    if level != Level.INFO:
        message = f"[{LEVEL_STYLES[level]}]{message}[/]"
    return (
        f"[dim]{stamp}[/] [{LEVEL_STYLES[level]}]{level.upper():<7}[/] job {event.job_id} "
        f"[{style}]{event.stage:<10} {event.state or '':<10}[/]{duration} {message}".rstrip()
    )


_SINCE = re.compile(r"^(\d+)([smhd])$")


def _parse_since(text: str) -> datetime:
    match = _SINCE.match(text)
    if not match:
        raise typer.BadParameter("use e.g. 30s, 10m, 2h, 1d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
    return datetime.now(UTC) - timedelta(**{unit: int(match[1])})


def logs(
    config: ConfigOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    job: Annotated[int | None, typer.Option("--job", help="Only this job.")] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="Only events that left the job in this state.")
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Only this Study Instance UID (or its prefix).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Only events newer than e.g. 10m.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON lines (the web API's event shape).")
    ] = False,
    poll_s: Annotated[float, typer.Option(hidden=True)] = 0.5,
) -> None:
    """Job events (state changes and stage timings), oldest first; -f follows live."""
    cutoff = _parse_since(since) if since else None
    views, _ = job_table(config)
    last_id = 0
    while True:
        with on_error():
            events = views.events_after(last_id, job_id=job)
        for event in events:
            last_id = event.id
            if cutoff is not None and event.at < cutoff:
                continue
            if state is not None and event.state != state:
                continue
            if study is not None and not event.study_instance_uid.startswith(study):
                continue
            if as_json:
                sys.stdout.write(json.dumps(event.to_json()) + "\n")
            else:
                console.print(event_line(event), highlight=False)
        sys.stdout.flush()
        if not follow:
            return
        if not events:
            time.sleep(poll_s)
