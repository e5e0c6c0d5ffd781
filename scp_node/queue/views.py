"""SHIM: replaced by the queue split. ``JobViews`` delegating to today's ``JobStore``."""

from __future__ import annotations

import builtins
from collections.abc import Collection

from sqlalchemy import Engine

from scp_node.errors import JobNotFoundError
from scp_node.queue import store as _store
from scp_node.queue.enums_shim import Level
from scp_node.queue.models import JobState
from scp_node.queue.records import JobEventView, JobView, SeriesInfo
from scp_node.queue.retry import RetryPolicy

__all__ = ["JobViews"]


def _guess_level(event: _store.JobEventView) -> Level:
    # Today's guess from the message text; the split stores the level with the event.
    text = event.message.lower()
    if event.state == JobState.FAILED.value or "gave up" in text or "giving up" in text:
        return Level.ERROR
    if "fail" in text or "refused" in text or "lost" in text or event.stage == "cancel":
        return Level.WARNING
    return Level.INFO


class JobViews(_store.JobStore):
    """Read-only views of the job table (shim)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, RetryPolicy())

    def list(
        self, state: JobState | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobView]:
        """Jobs, newest first."""
        return self.list_jobs(state=state, limit=limit, offset=offset)

    def get(self, job_id: int) -> JobView:
        """One job; raises JobNotFoundError."""
        view = self.get_job(job_id)
        if view is None:
            raise JobNotFoundError(f"no job {job_id}")
        return view

    def events_after(  # type: ignore[override]
        self, after_id: int, job_id: int | None = None, limit: int = 500
    ) -> builtins.list[JobEventView]:
        """Events after ``after_id``, oldest first, each with its level."""
        return [
            JobEventView(
                id=e.id,
                job_id=e.job_id,
                at=e.at,
                stage=e.stage,
                state=e.state,
                message=e.message,
                duration_s=e.duration_s,
                study_instance_uid=e.study_instance_uid,
                data=e.data,
                level=_guess_level(e),
            )
            for e in super().events_after(after_id, job_id=job_id, limit=limit)
        ]

    def counts(self) -> dict[str, int]:
        """Jobs per state, zero included."""
        return self.counts_by_state()

    def series_info(  # type: ignore[override]
        self, study_instance_uids: Collection[str]
    ) -> dict[str, builtins.list[SeriesInfo]]:
        """Series of each study (the real one is one query)."""
        one = super().series_info
        return {uid: one(uid) for uid in set(study_instance_uids)}
