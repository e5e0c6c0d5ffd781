"""SHIM: replaced by the queue split (the real records live here after it)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from scp_node.queue.enums_shim import Level
from scp_node.queue.store import DeliveryView, JobView, SeriesInfo

__all__ = ["DeliveryView", "JobEventView", "JobView", "SeriesInfo"]


@dataclass(frozen=True)
class JobEventView:
    """One event of a job's story; ``id`` grows monotonically."""

    id: int
    job_id: int
    at: datetime
    stage: str
    state: str
    message: str
    duration_s: float | None
    study_instance_uid: str
    data: dict[str, Any]
    level: Level

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ISO 8601 timestamp)."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "at": self.at.isoformat(),
            "stage": self.stage,
            "state": self.state,
            "message": self.message,
            "duration_s": self.duration_s,
            "study_instance_uid": self.study_instance_uid,
            "data": dict(self.data),
            "level": self.level.value,
        }
