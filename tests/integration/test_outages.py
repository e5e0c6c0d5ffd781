"""Destination outages against the real dispatch stage (``scp-node dispatch`` as a process):
give-up age reached -> job FAILED with the reason in ``jobs --json`` and ``logs``; a PACS
that aborts the association mid-transfer gets the SEG once it accepts, exactly once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import SCP_NODE, NodeProc
from tests.support.config import write_config
from tests.support.net import free_port, wait_until
from tests.support.pacs import AbortingPacsStub
from tests.support.seeded import job_state, make_seg, seed_delivering_job

pytestmark = pytest.mark.slow  # a dispatch process and several CLI runs: ~15 s each

# Short timings: retry after 0.2 s, give up 2 s after the first attempt.
RETRY = {"initial_backoff_s": 0.2, "max_backoff_s": 0.5, "give_up_after_s": 2.0}


def cli(config: Path, *args: str) -> str:
    """``scp-node ARGS --config CONFIG`` (config after the group name for ``jobs ...``)."""
    head, rest = (args[:1], args[1:]) if args[0] == "jobs" else (args, ())
    result = subprocess.run(
        [str(SCP_NODE), *head, "--config", str(config), *rest],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def job_json(config: Path, job_id: int) -> dict[str, Any]:
    (job,) = [j for j in json.loads(cli(config, "jobs", "--json")) if j["id"] == job_id]
    return dict(job)


@pytest.fixture
def seg_file(tmp_path: Path, ct_b_files: list[Path]) -> Path:
    return make_seg(ct_b_files, tmp_path / "seg.dcm")


def _dispatcher(root: Path, config: Path) -> NodeProc:
    return NodeProc("dispatch", config, root, "dispatch").start(wait=False)


def test_give_up_age_fails_the_job_with_the_reason(tmp_path: Path, seg_file: Path) -> None:
    dead_port = free_port()  # nothing listens: every attempt is refused
    config = write_config(tmp_path, free_port(), dead_port, retry=RETRY)
    job_id, _ = seed_delivering_job(config, seg_file)
    dispatch = _dispatcher(tmp_path, config)
    try:
        wait_until(lambda: job_state(config, job_id) == "failed", 90, "the job to fail")
    finally:
        dispatch.stop()

    job = job_json(config, job_id)
    assert "gave up" in job["error"] and "pacs" in job["error"], job
    assert "not established" in job["error"], job
    (delivery,) = job["deliveries"]
    assert delivery["state"] == "failed" and delivery["attempts"] >= 2, delivery
    assert "failed" in cli(config, "jobs")
    log = cli(config, "logs", "--job", str(job_id))
    assert "gave up" in log, log


def test_pacs_aborting_mid_transfer_gets_the_seg_exactly_once(
    tmp_path: Path, seg_file: Path
) -> None:
    pacs_port = free_port()
    config = write_config(tmp_path, free_port(), pacs_port, retry={**RETRY, "give_up_after_s": 600})
    job_id, seg_uid = seed_delivering_job(config, seg_file)
    pacs = AbortingPacsStub(tmp_path / "pacs", pacs_port, aborts=1).start()
    dispatch = _dispatcher(tmp_path, config)
    try:
        wait_until(lambda: job_state(config, job_id) == "done", 90, "the delivery")
    finally:
        dispatch.stop()
        pacs.stop()

    assert pacs.aborted == 1
    assert dict(pacs.received) == {seg_uid: 1}
    (delivery,) = job_json(config, job_id)["deliveries"]
    assert delivery["state"] == "done" and delivery["attempts"] == 2, delivery
    assert "no response" in cli(config, "logs", "--job", str(job_id))
