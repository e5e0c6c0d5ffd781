"""Scale-out on PostgreSQL: one `scp-node receive`, three `scp-node work` and one
`scp-node dispatch`, separate processes sharing one real PostgreSQL database and one spool
directory; workers are killed (-9) at random and restarted while studies flow through. A
worker holding a job's lease is preferred as the victim, and the test fails unless some kill
left a job leased by a dead worker and every such job was requeued (a ``requeue`` event).

Seeded: ``SCP_NODE_FAULT_SEED`` (default: a fresh random seed, printed).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.support.cluster import (
    NodeProc,
    StudyMaker,
    check_exactly_once,
    jobs_by_state,
    send_until_broken,
    settled,
    study_of,
)
from tests.support.config import write_config
from tests.support.net import PacsStub, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

STUDIES = 6
WORKERS = 3
KILLS = 6
LEASE_S = 4.0


def _lease_holders(db_url: str) -> dict[int, int]:
    """Running job id -> pid of the worker process holding its lease (owner ``host:pid:work``)."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, owner FROM jobs WHERE state = 'running' "
                    "AND lease_token IS NOT NULL AND owner IS NOT NULL"
                )
            ).all()
    finally:
        engine.dispose()
    return {int(job_id): int(str(owner).split(":")[-2]) for job_id, owner in rows}


def _requeue_events(db_url: str) -> dict[int, int]:
    """Job id -> number of its ``requeue`` events."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT job_id, count(*) FROM job_events WHERE stage = 'requeue' "
                    "GROUP BY job_id"
                )
            ).all()
    finally:
        engine.dispose()
    return {int(job_id): int(n) for job_id, n in rows}


def test_receive_three_workers_dispatch_on_postgresql_exactly_once(
    tmp_path: Path, postgres_url: str, ct_b_files: list[Path]
) -> None:
    env = os.environ.get("SCP_NODE_FAULT_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"\nscale-out: SCP_NODE_FAULT_SEED={seed}")  # noqa: T201
    rng = random.Random(seed)
    maker = StudyMaker(ct_b_files)
    root = tmp_path / "node"
    root.mkdir()
    port, pacs_port = free_port(), free_port()
    config = write_config(
        root,
        port,
        pacs_port,
        database={"url": postgres_url},
        worker={"lease_s": LEASE_S, "heartbeat_s": 0.5},
        retry={"max_attempts": 50, "initial_backoff_s": 0.2, "max_backoff_s": 0.5},
    )
    pacs = PacsStub(tmp_path / "pacs", pacs_port, delay_s=0.1).start()
    receiver = NodeProc("receive", config, root, "receive", port=port).start()
    # One config for every process, as on a shared host: each dashboard on its own port (a
    # taken web port stops start-up).
    own_web = {"SCP_NODE_WEB__PORT": "0"}
    workers = [NodeProc("work", config, root, f"work{i}", env=own_web) for i in range(WORKERS)]
    dispatcher = NodeProc("dispatch", config, root, "dispatch", env=own_web)
    for proc in [*workers, dispatcher]:
        proc.start()
    acked: set[str] = set()
    studies: set[str] = set()
    kills: list[str] = []
    #: Jobs a kill left leased by the dead worker (their lease must expire and be requeued).
    hit: list[int] = []
    sending_done = threading.Event()

    def killer() -> None:
        # Kill a worker every 0.5-2.5 s while the studies flow (one holding a lease when there
        # is one, else any) and restart it at once. Past KILLS, keep watching for a lease to
        # kill until one kill has hit, or until every study is through.
        while len(kills) < KILLS or not hit:
            hunting = len(kills) >= KILLS
            time.sleep(0.2 if hunting else rng.uniform(0.5, 2.5))
            if hunting and settled(postgres_url, STUDIES):
                break
            by_pid = {w.process.pid: w for w in workers if w.process is not None}
            held = [
                (job, by_pid[pid])
                for job, pid in _lease_holders(postgres_url).items()
                if pid in by_pid
            ]
            if not held and hunting:
                continue
            job, victim = rng.choice(held) if held else (None, rng.choice(workers))
            pid = victim.process.pid if victim.process is not None else None
            victim.kill9()
            kills.append(victim.name)
            # Still leased by the dead process once it is gone: the kill hit it.
            if job is not None and _lease_holders(postgres_url).get(job) == pid:
                hit.append(job)
            victim.start()
        sending_done.wait()

    try:
        batches = [
            maker.make(tmp_path / "studies" / str(i), rng.randint(10, 14)) for i in range(STUDIES)
        ]
        studies = {study_of(files[0]) for files in batches}
        chaos = threading.Thread(target=killer, daemon=True)
        chaos.start()
        for files in batches:
            while not send_until_broken(port, files, acked):
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 1.5))
        sending_done.set()
        chaos.join(timeout=120)
        wait_until(
            lambda: settled(postgres_url, STUDIES),
            240,
            f"seed {seed}: all studies processed; jobs {jobs_by_state(postgres_url)}",
        )
        check_exactly_once(postgres_url, acked, studies, pacs, f"seed {seed}")
        assert hit, f"seed {seed}: no kill hit a worker holding a lease (kills {kills})"
        requeued = _requeue_events(postgres_url)
        for job in hit:
            assert requeued.get(job, 0) >= 1, (
                f"seed {seed}: job {job} was left leased by a killed worker but never requeued"
            )
        for proc in [receiver, *workers, dispatcher]:
            assert proc.alive, f"{proc.name} died:\n{proc.log.read_text()[-3000:]}"
    finally:
        for proc in [receiver, *workers, dispatcher]:
            proc.stop()
        pacs.stop()
    print(  # noqa: T201 - the figures of the run, for the closing note
        f"scale-out passed: {STUDIES} studies, {len(acked)} instances, kills {kills} "
        f"({len(hit)} hit a leased job, each requeued), "
        f"{sum(pacs.received.values())} SEG receipts at the PACS for {len(studies)} SEGs"
    )
