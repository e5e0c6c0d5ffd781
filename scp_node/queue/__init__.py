"""The job table: instances, studies, jobs, their events and deliveries."""

from __future__ import annotations

from scp_node.queue.db import make_engine, session_factory, upgrade
from scp_node.queue.models import TERMINAL_STATES, DeliveryState, JobState
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.store import (
    ClaimedDelivery,
    ClaimedJob,
    DeliveryView,
    InstanceRecord,
    JobEventView,
    JobStore,
    JobView,
    SeriesInfo,
    utcnow,
)

__all__ = [
    "TERMINAL_STATES",
    "ClaimedDelivery",
    "ClaimedJob",
    "DeliveryState",
    "DeliveryView",
    "InstanceRecord",
    "JobEventView",
    "JobState",
    "JobStore",
    "JobView",
    "RetryPolicy",
    "SeriesInfo",
    "make_engine",
    "session_factory",
    "upgrade",
    "utcnow",
]
