"""SHIM: replaced by the queue split. ``JobAdmin`` delegating to today's ``JobStore``."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from scp_node.errors import JobNotFoundError, JobStateError, NodeError, QueueError
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.store import JobStore

__all__ = ["JobAdmin"]


class JobAdmin:
    """Retry and cancel (shim)."""

    def __init__(self, engine: Engine, retry_policy: RetryPolicy) -> None:
        self._store = JobStore(engine, retry_policy)

    def _do(self, job_id: int, action: str) -> None:
        if self._store.get_job(job_id) is None:
            raise JobNotFoundError(f"no job {job_id}")
        try:
            getattr(self._store, action)(job_id)
        except NodeError as exc:
            if isinstance(exc.__cause__, SQLAlchemyError):
                raise QueueError(str(exc)) from exc
            raise JobStateError(str(exc)) from exc

    def retry(self, job_id: int) -> None:
        """Retry a finished job; raises JobNotFoundError or JobStateError."""
        self._do(job_id, "retry_job")

    def cancel(self, job_id: int) -> None:
        """Cancel an unfinished job; raises JobNotFoundError or JobStateError."""
        self._do(job_id, "cancel_job")
