"""Presentation shared by the CLI and the dashboard: durations, ages, series summaries, the
job timeline and how events look.

Everything here is a pure function of the records :class:`~scp_node.queue.views.JobViews`
returns (plus one batched read for the series of a page of jobs); the CLI and ``web/`` both
import it, never each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from scp_node.queue.models import STAGE_ORDER, Level, Stage
from scp_node.queue.records import JobEventView, JobView, SegVersion, SeriesInfo
from scp_node.queue.views import JobViews

__all__ = [
    "LEVEL_STYLES",
    "STATE_STYLES",
    "JobRow",
    "SeriesSummary",
    "Step",
    "age",
    "event_payload",
    "format_duration",
    "job_rows",
    "measurement_rows",
    "seg_version",
    "series_summaries",
    "stage_durations",
    "summarize_series",
    "timeline",
]

#: rich styles of a job's state (the dashboard uses the state itself as a CSS class).
STATE_STYLES = {
    "queued": "cyan",
    "running": "yellow",
    "delivering": "magenta",
    "done": "green",
    "failed": "bold red",
    "cancelled": "dim",
}
#: rich styles of an event's level (the dashboard uses the level as a CSS class).
LEVEL_STYLES = {Level.ERROR: "bold red", Level.WARNING: "yellow", Level.INFO: "green"}

_STAMP = "%Y-%m-%d %H:%M:%S"


def format_duration(seconds: float | None) -> str:
    """``seconds`` for humans: ``"1.50s"`` below 10 s, ``"42.0s"`` below 100 s, else minutes.

    Returns an empty string for None (a stage that has not run).
    """
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.2f}s"
    return f"{seconds:.1f}s" if seconds < 100 else f"{seconds / 60:.1f}m"


def age(at: datetime, now: datetime | None = None) -> str:
    """``at`` as a short age, e.g. ``"42s"``, ``"5m"``, ``"3h"``, ``"2d"`` (never negative)."""
    seconds = max(0.0, ((now or datetime.now(UTC)) - at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def stage_durations(view: JobView) -> list[tuple[str, str]]:
    """The job's stage durations in the order a job goes through them, formatted."""
    return [(s, format_duration(view.durations[s])) for s in STAGE_ORDER if s in view.durations]


@dataclass(frozen=True)
class SeriesSummary:
    """What a person recognises a job's series by (no patient data)."""

    modality: str
    series_description: str
    slices: int

    def to_json(self) -> dict[str, Any]:
        """Return the keys the JSON API adds to a job."""
        return {
            "modality": self.modality,
            "series_description": self.series_description,
            "slices": self.slices,
        }


def summarize_series(view: JobView, infos: Sequence[SeriesInfo]) -> SeriesSummary:
    """The job's chosen series, else the study's largest, else an empty summary."""
    chosen = [i for i in infos if i.series_instance_uid == view.series_instance_uid]
    pick = chosen[0] if chosen else max(infos, key=lambda i: i.instance_count, default=None)
    if pick is None:
        return SeriesSummary("", "", 0)
    return SeriesSummary(pick.modality or "", pick.series_description or "", pick.instance_count)


def series_summaries(views: JobViews, jobs: Sequence[JobView]) -> dict[int, SeriesSummary]:
    """Series summary of each job of a page, by job id, from one read of the job table.

    Raises
    ------
    QueueError
        If the database read fails.
    """
    if not jobs:
        return {}
    infos = views.series_info({job.study_instance_uid for job in jobs})
    return {job.id: summarize_series(job, infos.get(job.study_instance_uid, [])) for job in jobs}


@dataclass(frozen=True)
class JobRow:
    """One line of a job list: the job and what is shown beside it."""

    job: JobView
    series: SeriesSummary
    age: str
    stages: list[tuple[str, str]]


def job_rows(views: JobViews, jobs: Sequence[JobView], now: datetime | None = None) -> list[JobRow]:
    """Rows for a page of jobs (one read for all their series).

    Raises
    ------
    QueueError
        If the database read fails.
    """
    summaries = series_summaries(views, jobs)
    return [
        JobRow(job, summaries[job.id], age(job.created_at, now), stage_durations(job))
        for job in jobs
    ]


@dataclass(frozen=True)
class Step:
    """One step of a job's timeline: reached or not, when, and how long it took."""

    name: str
    reached: bool
    at: str
    duration: str


def timeline(view: JobView, events: Sequence[JobEventView]) -> list[Step]:
    """received -> settled -> claimed -> inferred -> delivered, from the job's events.

    ``delivered`` is left out for a job that finished without a SEG.
    """

    def first(*stages: str) -> JobEventView | None:
        return next((e for e in events if e.stage in stages and e.state != "cancelled"), None)

    d = view.durations
    settled = first(Stage.SETTLED)
    received_at = ""
    if settled is not None:
        received_at = (settled.at - timedelta(seconds=d.get("settle_wait", 0.0))).strftime(_STAMP)
    claimed = first(Stage.CLAIM)
    # The inference event without a duration is the one that ends the worker's part.
    inferred = next(
        (
            e
            for e in events
            if (e.stage == Stage.INFERENCE and e.duration_s is None) or e.stage == Stage.DONE
        ),
        None,
    )
    delivered = next((e for e in events if e.stage == Stage.DONE), None) if view.seg_path else None
    work = sum(d.get(k, 0.0) for k in ("select", "load", "inference", "seg"))

    def step(name: str, event: JobEventView | None, duration: float | None) -> Step:
        if event is None:
            return Step(name, False, "", "")
        return Step(name, True, event.at.strftime(_STAMP), format_duration(duration))

    steps = [
        Step("received", settled is not None, received_at, format_duration(d.get("receive"))),
        step("settled", settled, d.get("settle_wait")),
        step("claimed", claimed, d.get("queue_wait")),
        step("inferred", inferred, work if inferred is not None else None),
    ]
    if view.seg_path is not None or view.outcome is None:
        steps.append(step("delivered", delivered, d.get("delivery")))
    return steps


def event_payload(event: JobEventView) -> dict[str, Any]:
    """The event as JSON (the shape of ``logs --json`` and the API) plus a short ``time``."""
    return {**event.to_json(), "time": event.at.strftime("%H:%M:%S")}


def seg_version(version: SegVersion | None) -> str:
    """``<SOP Instance UID> (instance N, job J)``, or an empty string for None."""
    if version is None:
        return ""
    return f"{version.sop_instance_uid} (instance {version.instance_number}, job {version.job_id})"


#: How a measurement unit (UCUM code) is shown.
_UNITS = {"[hnsf'U]": "HU", "{stored value}": "(stored values, no rescale)", "1": ""}


def measurement_rows(view: JobView) -> list[tuple[str, str, str, str, str]]:
    """Per segment of the job's SEG: (segment, label, volume, mean, SD) as shown.

    Volume in mL with one decimal; mean and standard deviation with one decimal and the
    unit (``HU`` for CT; "stored values" when the source had no rescale). Empty for a job
    without measurements.
    """
    rows: list[tuple[str, str, str, str, str]] = []
    for m in view.measurements:
        unit = _UNITS.get(str(m.get("unit")), str(m.get("unit_meaning", "")))
        suffix = f" {unit}" if unit else ""
        rows.append(
            (
                str(m["segment_number"]),
                str(m["label"]),
                f"{float(m['volume_ml']):.1f} mL",
                f"{float(m['mean']):.1f}{suffix}",
                f"{float(m['standard_deviation']):.1f}{suffix}",
            )
        )
    return rows
