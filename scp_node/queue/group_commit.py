"""Group commit for the receive stage: instances stored at about the same time share one
fsync of each directory and one database transaction.

Each C-STORE handler thread calls :meth:`GroupCommit.record` once its file is written,
fsynced and renamed (its directory not yet fsynced) and blocks until its row is committed.
The first caller becomes the leader: it takes every instance queued so far, fsyncs their
directories once each, records them all in one transaction and wakes their callers; the
instances that arrive meanwhile form the next group. Nothing waits on a timer, so a lone
sender pays no added latency, while concurrent senders share the fsyncs and the commit
(on PostgreSQL, and on SQLite for an engine with ``synchronous=FULL``, a commit waits for
its own fsync; the receive stage's SQLite engine commits with ``NORMAL``, see
:mod:`scp_node.spool`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scp_node.durable import fsync_dir
from scp_node.queue.intake import Intake
from scp_node.queue.records import InstanceRecord

__all__ = ["GroupCommit"]

logger = logging.getLogger(__name__)

#: Most instances in one transaction: a bound on how long the group's first caller waits.
MAX_GROUP = 64


@dataclass
class _Pending:
    rec: InstanceRecord
    done: bool = False
    is_new: bool = False
    error: BaseException | None = None


class GroupCommit:
    """Records stored instances durably, several per transaction.

    Parameters
    ----------
    intake : Intake
        Where the rows go.
    sync_dir : Callable[[Path], None]
        Makes a directory's new entries durable (:func:`scp_node.durable.fsync_dir`).
    max_group : int
        Most instances committed together.
    """

    def __init__(
        self,
        intake: Intake,
        *,
        sync_dir: Callable[[Path], None] = fsync_dir,
        max_group: int = MAX_GROUP,
    ) -> None:
        self._intake = intake
        self._sync_dir = sync_dir
        self._max_group = max_group
        self._lock = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False
        #: Groups committed and instances in them, for the tests and the benchmark.
        self.groups = 0
        self.instances = 0

    def record(self, rec: InstanceRecord) -> bool:
        """Make ``rec``'s directory entry durable and commit its row; return when both are.

        ``rec.path`` must already hold the complete, fsynced file.

        Returns
        -------
        bool
            True if the SOP Instance UID was new, False if it replaced an earlier copy.

        Raises
        ------
        QueueError
            If the database write of its group failed and recording it alone failed too.
        OSError
            If its directory could not be fsynced.
        """
        mine = _Pending(rec)
        with self._lock:
            self._queue.append(mine)
            while not mine.done and self._leading:
                self._lock.wait()
            if mine.done:
                return _result(mine)
            self._leading = True
            group, self._queue = self._queue[: self._max_group], self._queue[self._max_group :]
        try:
            self._commit(group)
        finally:
            with self._lock:
                self._leading = False
                for pending in group:
                    pending.done = True
                self._lock.notify_all()
        return _result(mine)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            for directory in dict.fromkeys(Path(p.rec.path).parent for p in group):
                self._sync_dir(directory)
            results = self._intake.record_instances([p.rec for p in group])
        except Exception as exc:
            if len(group) == 1:
                group[0].error = exc
                return
            # One bad row must not fail the others: each is recorded on its own.
            logger.warning("group commit failed; recording its instances one by one")
            for pending in group:
                try:
                    self._sync_dir(Path(pending.rec.path).parent)
                    pending.is_new = self._intake.record_instance(pending.rec)
                except Exception as single:
                    pending.error = single
            return
        for pending, is_new in zip(group, results, strict=True):
            pending.is_new = is_new
        self.groups += 1
        self.instances += len(group)


def _result(pending: _Pending) -> bool:
    if pending.error is not None:
        raise pending.error
    return pending.is_new
