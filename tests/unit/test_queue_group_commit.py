"""Group commit: instances stored while a commit runs share the next transaction and one
fsync per directory; each caller returns only once its own row is committed."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import func, select

from scp_node.queue.group_commit import GroupCommit
from scp_node.queue.models import Instance, Series, Study
from tests.unit.conftest import STUDY, InstanceFactory, Table

SENDERS = 6


class _WatchedQueue(list):  # type: ignore[type-arg]
    """The group commit's queue, telling the test when ``size`` senders have joined it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.full = threading.Event()

    def append(self, item: object) -> None:
        super().append(item)
        if len(self) >= self.size:
            self.full.set()


def _count(table: Table, model: type[Instance] | type[Series] | type[Study]) -> int:
    with table.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def test_instances_arriving_during_a_commit_share_the_next_one(
    table: Table, instance_factory: InstanceFactory, tmp_path: Path
) -> None:
    first_syncing, release = threading.Event(), threading.Event()
    synced: list[Path] = []

    def sync_dir(directory: Path) -> None:
        synced.append(directory)
        if len(synced) == 1:
            # The first group's leader holds here until every other sender has queued.
            first_syncing.set()
            assert release.wait(30)

    group = GroupCommit(table.intake, sync_dir=sync_dir)
    recs = [instance_factory() for _ in range(1 + SENDERS)]
    results: dict[str, bool] = {}
    done_before_release: list[str] = []

    def send(index: int) -> None:
        results[recs[index].sop_instance_uid] = group.record(recs[index])
        if not release.is_set():
            done_before_release.append(recs[index].sop_instance_uid)

    leader = threading.Thread(target=send, args=(0,))
    leader.start()
    assert first_syncing.wait(30)
    queued = _WatchedQueue(SENDERS)
    # The leader has taken its group and waits in sync_dir: watch the next one fill.
    with group._lock:
        group._queue = queued
    others = [threading.Thread(target=send, args=(i,)) for i in range(1, 1 + SENDERS)]
    for thread in others:
        thread.start()
    # Every other sender is queued behind the running commit, none returned before it.
    assert queued.full.wait(30)
    assert done_before_release == []
    release.set()
    for thread in [leader, *others]:
        thread.join(30)

    assert results == {rec.sop_instance_uid: True for rec in recs}
    assert (group.groups, group.instances) == (2, 1 + SENDERS)
    # One fsync of the spool directory per group, not per instance.
    assert synced == [Path(recs[0].path).parent] * 2
    assert _count(table, Instance) == 1 + SENDERS
    assert (_count(table, Study), _count(table, Series)) == (1, 1)
    with table.engine.connect() as conn:
        counted = conn.execute(
            select(Study.instance_count).where(Study.study_instance_uid == STUDY)
        ).scalar_one()
    assert counted == 1 + SENDERS


def test_a_resent_instance_in_the_same_group_is_one_row(
    table: Table, instance_factory: InstanceFactory
) -> None:
    rec = instance_factory()
    assert table.intake.record_instances([rec, rec, instance_factory()]) == [True, False, True]
    assert _count(table, Instance) == 2


def test_a_failing_row_fails_only_its_own_caller(
    table: Table, instance_factory: InstanceFactory
) -> None:
    good = instance_factory()
    # A NOT NULL column left empty: its transaction fails, the good row must still commit.
    bad = instance_factory(sop_class_uid=None)
    group = GroupCommit(table.intake, sync_dir=lambda _directory: None)
    outcome: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def send(rec: object, key: str) -> None:
        barrier.wait(30)
        try:
            outcome[key] = group.record(rec)  # type: ignore[arg-type]
        except Exception as exc:
            outcome[key] = exc

    threads = [
        threading.Thread(target=send, args=(good, "good")),
        threading.Thread(target=send, args=(bad, "bad")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcome["good"] is True
    assert isinstance(outcome["bad"], Exception)
    with table.engine.connect() as conn:
        uids = set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    assert uids == {good.sop_instance_uid}
