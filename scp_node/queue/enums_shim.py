"""SHIM: replaced by the queue split (the real enums live in ``scp_node/queue/models.py``)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Level", "Outcome", "Stage"]


class Level(StrEnum):
    """How loud an event is."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class Stage(StrEnum):
    """The stage names events and durations carry today."""

    RECEIVE = "receive"
    SETTLED = "settled"
    CLAIM = "claim"
    SELECT = "select"
    LOAD = "load"
    INFERENCE = "inference"
    SEG = "seg"
    DELIVER = "deliver"
    DONE = "done"
    FAIL = "fail"
    RETRY = "retry"
    CANCEL = "cancel"
    REQUEUE = "requeue"


class Outcome(StrEnum):
    """How a finished inference ended."""

    SEG = "seg"
    NO_FINDINGS = "no_findings"
    NO_MATCHING_SERIES = "no_matching_series"
