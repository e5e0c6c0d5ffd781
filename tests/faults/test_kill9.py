"""kill -9 of `scp-node serve` at random moments during receive, inference and dispatch.

Each trial sends a new study, kills the node in the trial's phase at a random moment,
restarts it, resends whatever was not acknowledged (as a modality would), waits until every
study is settled and processed, and checks the invariants over everything sent so far:
every acknowledged instance is in the spool and the table, every study has exactly one SEG
(one distinct SOP Instance UID) at the PACS, no job or delivery is left leased. A kill that
left a job running under the dead process's lease must show in that job's story as a
``requeue`` event, and at least one inference kill must have hit such a job: without the
fault the test fails.

Seeded: ``SCP_NODE_FAULT_SEED`` (default: a fresh random seed, printed, and named in every
failure message); ``SCP_NODE_FAULT_TRIALS`` (default 20).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.support.cluster import (
    NodeProc,
    StudyMaker,
    check_exactly_once,
    send_until_broken,
    settled,
    sop_of,
    study_of,
)
from tests.support.config import write_config
from tests.support.net import PacsStub, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TRIALS = int(os.environ.get("SCP_NODE_FAULT_TRIALS", "20"))
PHASES = ("receive", "inference", "dispatch")
LEASE_S = 4.0
SETTLE_TIMEOUT_S = 120.0


def _seed() -> int:
    env = os.environ.get("SCP_NODE_FAULT_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**31)


def _job_state(engine: Any, study: str) -> set[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT jobs.state FROM jobs JOIN studies ON studies.id = jobs.study_id "
                "WHERE studies.study_instance_uid = :uid"
            ),
            {"uid": study},
        )
        return {str(r[0]) for r in rows}


def _running_job(engine: Any, study: str) -> int | None:
    """The study's job left RUNNING under a lease (read after the kill: nothing changes it
    until the restarted node requeues it), or None."""
    with engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT jobs.id FROM jobs JOIN studies ON studies.id = jobs.study_id "
                "WHERE studies.study_instance_uid = :uid AND jobs.state = 'running' "
                "AND jobs.lease_token IS NOT NULL"
            ),
            {"uid": study},
        ).scalar_one_or_none()


def _requeue_events(engine: Any, job_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM job_events WHERE job_id = :id AND stage = 'requeue'"),
                {"id": job_id},
            ).scalar_one()
        )


def _resend_all(port: int, files: list[Path], acked: set[str], context: str) -> None:
    deadline = time.monotonic() + 60
    while not send_until_broken(port, files, acked):
        assert time.monotonic() < deadline, f"{context}: node refuses the resend"
        time.sleep(0.2)


def test_kill9_at_random_moments_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, ct_b_files: list[Path]
) -> None:
    seed = _seed()
    print(f"\nfault trials: SCP_NODE_FAULT_SEED={seed} SCP_NODE_FAULT_TRIALS={TRIALS}")  # noqa: T201
    rng = random.Random(seed)
    maker = StudyMaker(ct_b_files)
    root = tmp_path / "node"
    root.mkdir()
    port, pacs_port = free_port(), free_port()
    db_url = f"sqlite:///{root / 'node.db'}"
    config = write_config(
        root,
        port,
        pacs_port,
        worker={"lease_s": LEASE_S, "heartbeat_s": 0.5},
        # Kills cost attempts (an expired lease counts as one); faults are not model errors.
        retry={"max_attempts": 50, "initial_backoff_s": 0.2, "max_backoff_s": 0.5},
    )
    # The PACS answers 0.3 s after storing, so a kill lands between its receipt and our
    # record of it: the resend after restart must still give one SEG (same SOP UID).
    pacs = PacsStub(tmp_path / "pacs", pacs_port, delay_s=0.3).start()
    node = NodeProc("serve", config, root, "serve", port=port).start()
    engine = create_engine(db_url)
    acked: set[str] = set()
    studies: set[str] = set()
    tally = dict.fromkeys(PHASES, 0)
    #: Jobs a kill left running under the dead node's lease.
    hit: list[int] = []
    try:
        for trial in range(TRIALS):
            phase = rng.choice(PHASES)
            tally[phase] += 1
            context = f"seed {seed} trial {trial} ({phase})"
            files = maker.make(tmp_path / "studies" / str(trial), rng.randint(10, 14))
            study = study_of(files[0])
            studies.add(study)

            if phase == "receive":
                # Kill after a random number of acknowledgements, plus a random sliver.
                kill_after = rng.randint(0, len(files) - 1)
                sop_uids = {sop_of(f) for f in files}
                sender = threading.Thread(
                    target=send_until_broken, args=(port, files, acked), daemon=True
                )
                sender.start()
                wait_until(
                    lambda uids=sop_uids, n=kill_after, t=sender: (
                        len(acked & uids) >= n or not t.is_alive()
                    ),
                    30,
                    f"{context}: {kill_after} acknowledgements",
                    poll_s=0.005,
                )
                time.sleep(rng.uniform(0, 0.05))
                node.kill9()
                sender.join(timeout=60)
            else:
                _resend_all(port, files, acked, context)
                wanted = "running" if phase == "inference" else "delivering"
                wait_until(
                    lambda w=wanted, uid=study: w in _job_state(engine, uid),
                    SETTLE_TIMEOUT_S,
                    f"{context}: job {wanted}",
                    poll_s=0.01,
                )
                time.sleep(rng.uniform(0, 0.5 if phase == "inference" else 0.35))
                node.kill9()
            leased = _running_job(engine, study)
            if leased is not None:
                hit.append(leased)

            node.start()
            _resend_all(port, files, acked, context)
            wait_until(
                lambda: settled(db_url, len(studies)),
                SETTLE_TIMEOUT_S,
                f"{context}: all studies processed\n{node.log.read_text()[-3000:]}",
            )
            check_exactly_once(db_url, acked, studies, pacs, context)
            if leased is not None:
                assert _requeue_events(engine, leased) >= 1, (
                    f"{context}: the kill left job {leased} leased, but it was never requeued"
                )
        if tally["inference"]:
            assert hit, f"seed {seed}: no inference kill hit a job holding a lease"
    finally:
        engine.dispose()
        node.stop()
        pacs.stop()
    print(  # noqa: T201 - the figures of the run, for the closing note
        f"fault trials passed: {TRIALS} ({', '.join(f'{k} {v}' for k, v in tally.items())}), "
        f"{len(hit)} kills hit a leased job (each requeued), "
        f"{len(acked)} instances acknowledged, {sum(pacs.received.values())} SEG receipts "
        f"at the PACS for {len(studies)} SEGs"
    )
