"""The worker prepares ahead of its jobs: warm-up at start, read-ahead while a study arrives.

Real subject B files, a real SQLite job table, a stand-in network that records what it
was asked (the node's model code is tested elsewhere)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from scp_node.app import Database, build_queue
from scp_node.inference.pool import ModelPool
from scp_node.queue import InstanceRecord, RetryPolicy, make_engine, upgrade
from scp_node.worker import Worker, WorkerConfig
from tests.conftest import REPO_ROOT
from tests.support.records import record_file

MODEL = "ct-abdomen"


class RecordingModel:
    """A box of label 1 on every slice; remembers the shape and spacing of each call."""

    device = "cpu"
    batch_size = 4

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[int, ...], tuple[float, ...]]] = []

    def predict(self, image: np.ndarray, spacing_zyx: Any, direction: Any = None) -> np.ndarray:
        self.calls.append((tuple(image.shape), tuple(float(v) for v in spacing_zyx)))
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[:, 200:300, 200:300] = 1
        return labels


def _record(db: Database, path: Path) -> None:
    record_file(db.intake, path, "MODALITY")


@pytest.fixture
def databases(tmp_path: Path) -> Iterator[tuple[Database, Database]]:
    """Two job tables: one for a worker that prepares, one for a worker that does not."""
    engines = [make_engine(f"sqlite:///{tmp_path / f'node-{i}.db'}") for i in range(2)]
    for engine in engines:
        upgrade(engine)
    policy = RetryPolicy(3, 5.0, 60.0, 2.0, 3600.0)
    yield build_queue(engines[0], policy), build_queue(engines[1], policy)
    for engine in engines:
        engine.dispose()


def _worker(
    db: Database, outbox: Path, *, prepare: bool, read_ahead: bool = True
) -> tuple[Worker, RecordingModel]:
    model = RecordingModel()
    pool = ModelPool(REPO_ROOT / "models", [MODEL], lambda _spec: model)
    pool.get(MODEL)  # loaded, as the node's start-up verification leaves it
    config = WorkerConfig(
        "w", outbox, (), 600.0, 300.0, "test", prepare=prepare, read_ahead=read_ahead
    )
    return Worker(db.work, pool, config), model


def test_worker_reads_ahead_and_readies_the_model_while_a_study_arrives(
    tmp_path: Path, ct_b_files: list[Path], databases: tuple[Database, Database]
) -> None:
    db, plain_db = databases
    worker, model = _worker(db, tmp_path / "outbox", prepare=True)
    assert not worker.run_once()  # nothing arriving, nothing queued

    header = pydicom.dcmread(ct_b_files[0], stop_before_pixels=True)
    spacing = tuple(float(v) for v in header.PixelSpacing)
    for path in ct_b_files[:12]:
        _record(db, path)
    assert worker.run_once()  # read ahead: counts as work
    # One batch of zeros of the arriving size, once, before any job.
    assert model.calls == [((4, 512, 512), (1.0, *spacing))]
    assert len(worker.headers) == 12
    for path in ct_b_files[12:]:
        _record(db, path)
    assert worker.run_once()
    assert not worker.run_once()  # every arriving file read; the size is ready
    assert len(model.calls) == 1
    assert len(worker.headers) == len(ct_b_files)

    (job_id,) = db.settling.settle(0.0, [MODEL])
    assert worker.run_once()
    assert model.calls[-1][0] == (len(ct_b_files), 512, 512)
    assert len(worker.headers) == 0  # taken by the job's selection
    job = db.views.get(job_id)
    assert job.seg_path is not None

    # The same SEG as a worker that prepares nothing builds (UIDs are deterministic).
    plain, _ = _worker(plain_db, tmp_path / "plain-outbox", prepare=False)
    for path in ct_b_files:
        _record(plain_db, path)
    (plain_id,) = plain_db.settling.settle(0.0, [MODEL])
    assert plain.run_once()
    plain_job = plain_db.views.get(plain_id)
    assert plain_job.seg_path is not None
    seg = pydicom.dcmread(job.seg_path)
    plain_seg = pydicom.dcmread(plain_job.seg_path)
    assert seg.SOPInstanceUID == plain_seg.SOPInstanceUID
    assert seg.PixelData == plain_seg.PixelData
    assert seg.PerFrameFunctionalGroupsSequence == plain_seg.PerFrameFunctionalGroupsSequence
    assert seg.ReferencedSeriesSequence == plain_seg.ReferencedSeriesSequence


def test_a_file_rewritten_after_read_ahead_is_read_again(
    tmp_path: Path, ct_b_files: list[Path], databases: tuple[Database, Database]
) -> None:
    db, _ = databases
    worker, _model = _worker(db, tmp_path / "outbox", prepare=True)
    spool = tmp_path / "spool"
    spool.mkdir()
    copies = []
    for path in ct_b_files:
        copy = spool / path.name
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
        _record(db, copy)
    assert worker.run_once()
    # A resent instance replaces its file: same UIDs, another InstanceNumber.
    ds = pydicom.dcmread(copies[0])
    ds.InstanceNumber = 999
    ds.save_as(copies[0], enforce_file_format=True)
    headers = {}
    for copy in copies:
        headers[copy], _offset = worker.headers.take(copy)
    assert int(headers[copies[0]].InstanceNumber) == 999
    assert len(worker.headers) == 0


def test_worker_warm_up_runs_the_job_code_on_a_synthetic_series(
    tmp_path: Path, databases: tuple[Database, Database], caplog: pytest.LogCaptureFixture
) -> None:
    db, _ = databases
    worker, model = _worker(db, tmp_path / "outbox", prepare=True)
    with caplog.at_level(logging.INFO, logger="scp_node"):
        worker.warm_up()
    assert any(r.getMessage().startswith("worker warmed up") for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert model.calls == []  # the network is readied per arriving size, not here
    assert not (tmp_path / "outbox").exists()


def test_worker_reads_ahead_only_what_a_served_model_takes(
    tmp_path: Path, ct_b_files: list[Path], databases: tuple[Database, Database]
) -> None:
    db, _ = databases
    worker, model = _worker(db, tmp_path / "outbox", prepare=True)
    path = ct_b_files[0]
    db.intake.record_instance(
        InstanceRecord(
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
            sop_instance_uid="1.2.3.4.5",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            modality="MR",  # the CT model's card takes CT only
            path=str(path),
            size_bytes=path.stat().st_size,
            calling_ae="MODALITY",
        )
    )
    assert worker.run_once()  # looked at
    assert not worker.run_once()
    assert len(worker.headers) == 0
    assert model.calls == []


def test_a_worker_sharing_its_process_with_a_receiver_does_not_read_ahead(
    tmp_path: Path, ct_b_files: list[Path], databases: tuple[Database, Database]
) -> None:
    db, _ = databases
    worker, model = _worker(db, tmp_path / "outbox", prepare=True, read_ahead=False)
    for path in ct_b_files:
        _record(db, path)
    assert not worker.run_once()  # arriving instances, but no read-ahead
    assert len(worker.headers) == 0
    assert model.calls == []
    (job_id,) = db.settling.settle(0.0, [MODEL])
    assert worker.run_once()  # the job still runs, reading its own headers
    assert db.views.get(job_id).seg_path is not None
