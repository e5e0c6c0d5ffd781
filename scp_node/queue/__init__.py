"""The job table, split by its users: :class:`Intake` (receive), :class:`Settling` (settle),
:class:`WorkQueue` (worker), :class:`Deliveries` (dispatch), :class:`JobAdmin` and
:class:`JobViews` (CLI and web). Records in :mod:`scp_node.queue.records`."""

from __future__ import annotations

from scp_node.queue.admin import JobAdmin
from scp_node.queue.db import make_engine, session_factory, upgrade
from scp_node.queue.deliveries import Deliveries
from scp_node.queue.intake import Intake
from scp_node.queue.models import (
    TERMINAL_STATES,
    DeliveryKind,
    DeliveryState,
    JobState,
    Level,
    Outcome,
    Stage,
)
from scp_node.queue.records import (
    ClaimedDelivery,
    ClaimedJob,
    DeliveryTarget,
    DeliveryView,
    InstanceRecord,
    JobEventView,
    JobView,
    OutputObject,
    RejectionNote,
    SegVersion,
    SeriesInfo,
    Supersession,
    UnsettledStudy,
    WorkerLease,
)
from scp_node.queue.retry import RetryPolicy
from scp_node.queue.settling import Settling
from scp_node.queue.tx import utcnow
from scp_node.queue.views import JobViews
from scp_node.queue.work import WorkQueue

__all__ = [
    "TERMINAL_STATES",
    "ClaimedDelivery",
    "ClaimedJob",
    "Deliveries",
    "DeliveryKind",
    "DeliveryState",
    "DeliveryTarget",
    "DeliveryView",
    "InstanceRecord",
    "Intake",
    "JobAdmin",
    "JobEventView",
    "JobState",
    "JobView",
    "JobViews",
    "Level",
    "Outcome",
    "OutputObject",
    "RejectionNote",
    "RetryPolicy",
    "SegVersion",
    "SeriesInfo",
    "Settling",
    "Stage",
    "Supersession",
    "UnsettledStudy",
    "WorkQueue",
    "WorkerLease",
    "make_engine",
    "session_factory",
    "upgrade",
    "utcnow",
]
