"""The settle stage: received studies become queued jobs, expired leases are taken back.

A study becomes one job per model once nothing has arrived for ``settle.quiet_s`` (the quiet
rule), and the same sweep requeues jobs whose worker stopped heartbeating. With
``settle.completeness_check`` the :class:`CompletenessGate` settles early when a study is
known to be complete, later when it is known not to be.

The quiet rule guesses that a study is complete. When the sending PACS answers C-FIND, the
node can know instead: it asks
for NumberOfSeriesRelatedInstances of every series it received. All there -> settle now (no
quiet wait at all). Some missing -> keep waiting past ``quiet_s``, until they arrive or
``max_wait_s`` after the last instance, when the study is settled as it is.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from scp_node.dicom.query import series_instance_counts
from scp_node.dicom.scu import Peer
from scp_node.errors import NodeError
from scp_node.queue.records import UnsettledStudy
from scp_node.queue.settling import Router, Settling
from scp_node.queue.tx import Clock, utcnow
from scp_node.settings import Source
from scp_node.stage_loop import run_stage

logger = logging.getLogger(__name__)

CountQuery = Callable[[Peer, str], dict[str, int]]
#: A sweep meant for a study's quiet deadline runs this much after it (clock granularity).
_DEADLINE_MARGIN_S = 0.01


@dataclass(frozen=True)
class SettleDecision:
    """Studies to settle now regardless of quiet, and studies not to settle yet."""

    ready: frozenset[str]
    hold: frozenset[str]
    #: Series whose every instance has arrived (the PACS's count), wherever their study is:
    #: a per-series model's job for them may start without waiting ``series_quiet_s``.
    complete_series: frozenset[str] = frozenset()


class CompletenessGate:
    """Decides, per unsettled study, from the sending PACS's own instance counts."""

    def __init__(
        self,
        sources: Sequence[Source],
        *,
        calling_ae: str,
        quiet_s: float,
        max_wait_s: float,
        query_interval_s: float,
        query: CountQuery | None = None,
    ) -> None:
        self._sources = {s.ae_title: Peer(s.ae_title, s.host, s.port) for s in sources}
        self._quiet_s = quiet_s
        self._max_wait_s = max_wait_s
        self._interval_s = query_interval_s
        self._query: CountQuery = query or (
            lambda peer, uid: series_instance_counts(peer, uid, calling_ae=calling_ae)
        )
        #: study uid -> (instance count when asked, monotonic time asked, answer, not logged)
        self._asked: dict[str, tuple[int, float, dict[str, int] | None, bool]] = {}

    def _expected(self, study: UnsettledStudy, peer: Peer) -> dict[str, int] | None:
        uid = study.study_instance_uid
        cached = self._asked.get(uid)
        if (
            cached is not None
            and cached[0] == study.instance_count
            and time.monotonic() - cached[1] < self._interval_s
        ):
            return cached[2]
        try:
            answer: dict[str, int] | None = self._query(peer, uid)
        except (NodeError, OSError, ValueError) as exc:
            logger.warning(
                "completeness query failed; quiet rule applies",
                extra={"study_instance_uid": uid, "source": str(peer), "error": str(exc)},
            )
            answer = None
        self._asked[uid] = (study.instance_count, time.monotonic(), answer, True)
        return answer

    def decide(self, studies: Sequence[UnsettledStudy], now: datetime) -> SettleDecision:
        """Ready and held studies among ``studies``; the others follow the quiet rule."""
        ready: set[str] = set()
        hold: set[str] = set()
        complete_series: set[str] = set()
        for study in studies:
            peer = next(
                (self._sources[ae] for ae in study.calling_aes if ae in self._sources), None
            )
            if peer is None:
                continue
            expected = self._expected(study, peer)
            if not expected:
                continue
            complete_series.update(
                series
                for series, count in expected.items()
                if count > 0 and study.series_counts.get(series, 0) >= count
            )
            missing = {
                series: count - study.series_counts.get(series, 0)
                for series, count in expected.items()
                if series in study.series_counts and study.series_counts[series] < count
            }
            uid = study.study_instance_uid
            if not missing:
                ready.add(uid)
                continue
            quiet_for = (now - study.last_received_at).total_seconds()
            if quiet_for < self._max_wait_s:
                hold.add(uid)
                if self._asked[uid][3]:
                    self._asked[uid] = (*self._asked[uid][:3], False)  # log once per answer
                    logger.info(
                        "study incomplete: waiting for missing instances",
                        extra={"study_instance_uid": uid, "missing": sum(missing.values())},
                    )
            else:
                logger.warning(
                    "study still incomplete after settle.max_wait_s: settling it as it is",
                    extra={"study_instance_uid": uid, "missing": sum(missing.values())},
                )
        for uid in set(self._asked) - {s.study_instance_uid for s in studies}:
            del self._asked[uid]  # settled: forget
        return SettleDecision(frozenset(ready), frozenset(hold), frozenset(complete_series))


class Settler:
    """One settle sweep per poll: gate (if any), quiet rule, requeue of expired leases.

    The quiet rule waits ``quiet_s`` after the settler starts, too: a study whose last
    instance came before a stop or crash went "quiet" only because the node was not
    listening, and the sender resending it after the restart must not find a partial study
    already settled (that would build a SEG of part of the series, then a second one).

    Parameters
    ----------
    settling : Settling
        The settle stage's piece of the job table.
    models : Sequence[str] or Mapping of str to (Router or None)
        One job per model and study, for the models whose router takes the study (see
        :meth:`Settling.settle`).
    quiet_s : float
        Seconds without a new instance before a study settles by the quiet rule.
    gate : CompletenessGate or None
        Asks the sending PACS whether a study is complete (``settle.completeness_check``).
    wake_work : threading.Event or None
        Set when a job was queued or requeued, so a worker in this process claims it at once.
    clock : Callable[[], datetime]
        Timezone-aware current time for the gate (injected by tests).
    per_series : Collection[str]
        Models (among ``models``) whose cards say they work per series: each series their
        router takes becomes a job once it has been quiet for ``series_quiet_s``, while the
        rest of the study may still arrive.
    series_quiet_s : float
        Seconds without a new instance before a series of a per-series model settles; with
        ``gate``, a series whose count at the PACS has arrived settles at once.
    """

    def __init__(
        self,
        settling: Settling,
        models: Sequence[str] | Mapping[str, Router | None],
        quiet_s: float,
        *,
        gate: CompletenessGate | None = None,
        wake_work: threading.Event | None = None,
        clock: Clock = utcnow,
        per_series: Collection[str] = (),
        series_quiet_s: float = 0.0,
    ) -> None:
        self.settling = settling
        self.models: Sequence[str] | Mapping[str, Router | None] = (
            dict(models) if isinstance(models, Mapping) else tuple(models)
        )
        self.quiet_s = quiet_s
        self.gate = gate
        self._wake_work = wake_work
        self._clock = clock
        self._quiet_from = clock() + timedelta(seconds=quiet_s)
        self.per_series = frozenset(per_series)
        self.series_quiet_s = series_quiet_s
        self._series_quiet_from = clock() + timedelta(seconds=series_quiet_s)

    def run(self, stop: threading.Event, poll_s: float) -> None:
        """Sweep every ``poll_s`` until ``stop`` is set, and when a study turns quiet.

        A study whose quiet period ends before the next poll is swept for at that moment,
        not up to ``poll_s`` later: that wait is part of every job's latency.
        """

        def sweep() -> bool:
            if self.run_once():
                return True
            due_in = self.next_quiet_in()
            if due_in is None or due_in >= poll_s:
                return False
            stop.wait(due_in + _DEADLINE_MARGIN_S)
            return True  # sweep again at once: the study is quiet now

        run_stage("settle", sweep, stop, poll_s)

    def next_quiet_in(self) -> float | None:
        """Seconds until the next unsettled study becomes quiet by the quiet rule, or the
        next series of a per-series model by ``series_quiet_s``.

        ``None`` when no such deadline is ahead (none waits, or each is past it and
        settles, or is held, by the sweeps themselves).

        Raises
        ------
        QueueError
            If the job table cannot be read.
        """
        now = self._clock()
        deadlines = [
            max(study.last_received_at + timedelta(seconds=self.quiet_s), self._quiet_from)
            for study in self.settling.unsettled_studies()
        ]
        if self.per_series:
            # A per-series model's series is due on its own, shorter timer.
            deadlines += [
                max(last + timedelta(seconds=self.series_quiet_s), self._series_quiet_from)
                for last in self.settling.series_last_received()
            ]
        ahead = [deadline for deadline in deadlines if deadline > now]
        return (min(ahead) - now).total_seconds() if ahead else None

    def run_once(self) -> bool:
        """One sweep; True when it queued or requeued a job.

        Raises
        ------
        QueueError
            If the job table cannot be read or written.
        """
        created: list[int] = []
        hold: frozenset[str] = frozenset()
        decision = (
            self.gate.decide(self.settling.unsettled_studies(), self._clock())
            if self.gate is not None
            else None
        )
        complete = decision.complete_series if decision is not None else frozenset()
        by_quiet = self._clock() >= self._series_quiet_from
        if self.per_series and (by_quiet or complete):
            routers = (
                self.models
                if isinstance(self.models, Mapping)
                else dict.fromkeys(self.models, None)
            )
            # A series the PACS's count says is complete starts at once, even in the
            # start-up wait: the count, not a guess from quiet, says nothing more comes.
            created += self.settling.settle_series(
                self.series_quiet_s,
                {m: routers[m] for m in self.per_series if m in routers},
                complete=complete,
                by_quiet=by_quiet,
            )
        if decision is not None:
            hold = decision.hold
            if decision.ready:
                created += self.settling.settle(
                    0.0, self.models, only=decision.ready, per_series=self.per_series
                )
        if self._clock() >= self._quiet_from:
            created += self.settling.settle(
                self.quiet_s, self.models, exclude=hold, per_series=self.per_series
            )
        requeued = self.settling.requeue_expired()
        if (created or requeued) and self._wake_work is not None:
            self._wake_work.set()
        return bool(created or requeued)
