"""The one poll/wake loop that the settle, worker and dispatch stages share."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["run_stage"]

logger = logging.getLogger(__name__)


def run_stage(
    name: str,
    step: Callable[[], bool],
    stop: threading.Event,
    poll_s: float,
    wake: threading.Event | None = None,
) -> None:
    """Call ``step`` until ``stop`` is set.

    While ``step`` returns True (it did some work; more may be waiting) it is called again at
    once. Otherwise the loop waits ``poll_s``, or less when ``wake`` is set by the stage
    before it in the same process. An exception from ``step`` is logged with its traceback
    and counts as no work, so one bad item never stops the stage.

    Parameters
    ----------
    name : str
        The stage, for the log lines (``settle``, ``work``, ``dispatch``).
    step : Callable[[], bool]
        One round of the stage.
    stop : threading.Event
        Ends the loop; whoever sets it also sets ``wake`` so an idle wait ends at once.
    poll_s : float
        Longest idle wait, seconds (> 0).
    wake : threading.Event or None
        Ends an idle wait early; cleared after each wait.

    Raises
    ------
    ValueError
        If ``poll_s`` is not positive.
    """
    if poll_s <= 0:
        raise ValueError(f"poll_s must be > 0, got {poll_s}")
    logger.debug("stage loop started", extra={"stage": name})
    while not stop.is_set():
        try:
            worked = step()
        except Exception:
            logger.exception("stage loop error", extra={"stage": name})
            worked = False
        if not worked:
            (wake or stop).wait(poll_s)
            if wake is not None:
                wake.clear()
    logger.debug("stage loop stopped", extra={"stage": name})
