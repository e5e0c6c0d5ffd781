"""A job table seeded with one job whose SEG waits for delivery, for tests that run only the
dispatch stage (``scp-node dispatch``) as a real process against real peers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from sqlalchemy import create_engine, func, select, text

from scp_node.app import Database, build_queue, delivery_target, retry_policy
from scp_node.dicom.volume import load_volume
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import Instance, Outcome
from scp_node.queue.records import InstanceRecord, Supersession
from scp_node.settings import load_settings
from tests.conftest import REPO_ROOT


def make_seg(sources: list[Path], out: Path) -> Path:
    """A real highdicom SEG of ``sources`` (a box label), written to ``out``."""
    volume = load_volume(sources)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[2:-2, 200:300, 200:300] = 1
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    seg = build_segmentation(volume, labels, spec, software_version="test")
    assert seg is not None
    write_segmentation(seg, out)
    return out


def seed_delivering_job(config: Path, seg_path: Path) -> tuple[int, str]:
    """Put one job in ``delivering`` into the database of ``config``, its SEG at ``seg_path``
    addressed to every ``[[destinations]]`` of that config.

    Returns the job id and the SEG's SOP Instance UID.
    """
    settings = load_settings(config)
    engine = make_engine(settings.database.url)
    try:
        upgrade(engine)
        jobs = build_queue(engine, retry_policy(settings.retry))
        seg = dcmread(seg_path, stop_before_pixels=True)
        source: Any = seg.ReferencedSeriesSequence[0]
        study, series = str(seg.StudyInstanceUID), str(source.SeriesInstanceUID)
        sop = str(source.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
        jobs.intake.record_instance(
            InstanceRecord(
                study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", "CT", "x", 1, "T"
            )
        )
        jobs.settling.settle(0.0, [settings.worker.model])
        job = jobs.work.claim("seeder", 60.0)
        assert job is not None
        jobs.work.complete(
            job.id,
            job.token,
            series_instance_uid=series,
            seg_path=str(seg_path),
            seg_sop_instance_uid=str(seg.SOPInstanceUID),
            outcome=Outcome.SEG,
            destinations=[delivery_target(d) for d in settings.destinations],
        )
        return job.id, str(seg.SOPInstanceUID)
    finally:
        engine.dispose()


def job_state(config: Path, job_id: int) -> str:
    """The job's state read straight from the table of ``config`` (cheap enough to poll)."""
    engine = create_engine(load_settings(config).database.url)
    try:
        with engine.connect() as conn:
            query = text("SELECT state FROM jobs WHERE id = :id")
            return str(conn.execute(query, {"id": job_id}).scalar_one())
    finally:
        engine.dispose()


def instance_rows(db_url: str) -> int:
    """How many instances the job table holds."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(Instance)).scalar_one())
    finally:
        engine.dispose()


#: The SEG series and the two SEGs of :func:`seed_superseding_pair`.
PAIR_SEG_SERIES = "2.25.7001"
PAIR_OLD_SEG, PAIR_NEW_SEG = "2.25.7002", "2.25.7003"


def seed_superseding_pair(jobs: Database, study: str) -> tuple[int, int]:
    """Two finished jobs of one study whose SEGs (instances 1 and 2 of one SEG series) are
    versions of one result: the second supersedes the first. No destinations, no files.
    The table must hold no other queued job (each new job is claimed as the next one).

    Returns the ids of the first and the second job.
    """
    ids: list[int] = []
    for number, sop in enumerate((PAIR_OLD_SEG, PAIR_NEW_SEG), start=1):
        jobs.intake.record_instance(
            InstanceRecord(
                study,
                f"{study}.1",
                f"{study}.1.{number}",
                "1.2.840.10008.5.1.4.1.1.2",
                "1.2",
                "CT",
                "x",
                1,
                "T",
            )
        )
        created = jobs.settling.settle(0.0, ["ct-abdomen"])
        job = jobs.work.claim("seeder", 60.0)
        assert job is not None and [job.id] == created
        previous = jobs.work.seg_history(PAIR_SEG_SERIES)
        jobs.work.complete(
            job.id,
            job.token,
            series_instance_uid=f"{study}.1",
            seg_path=f"/outbox/{job.id}/{sop}.dcm",
            seg_sop_instance_uid=sop,
            outcome=Outcome.SEG,
            destinations=[],
            seg_series_instance_uid=PAIR_SEG_SERIES,
            seg_instance_number=number,
            supersedes=Supersession(previous[-1]) if previous else None,
        )
        ids.append(job.id)
    return ids[0], ids[1]
