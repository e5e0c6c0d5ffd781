"""Dispatch against a real PACS stand-in: a refusal status is recorded and retried."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from scp_node.app import build_queue, delivery_target
from scp_node.dicom.volume import load_volume
from scp_node.dispatch import Dispatcher
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import Outcome
from scp_node.queue.records import InstanceRecord
from scp_node.queue.retry import RetryPolicy
from scp_node.settings import Destination
from tests.conftest import REPO_ROOT
from tests.support.net import PacsStub, free_port


class Clock:
    """A clock the test moves by hand, so backoff needs no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def seg_file(tmp_path: Path, ct_b_files: list[Path]) -> Path:
    volume = load_volume(ct_b_files)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[5:15, 200:300, 200:300] = 1
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    seg = build_segmentation(volume, labels, spec, software_version="test")
    assert seg is not None
    path = tmp_path / "seg.dcm"
    write_segmentation(seg, path)
    return path


def test_refusal_is_recorded_and_retried_until_accepted(tmp_path: Path, seg_file: Path) -> None:
    clock = Clock()
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    jobs = build_queue(engine, RetryPolicy(3, 5.0, 60.0, 2.0, 3600.0), clock)
    jobs.intake.record_instance(
        InstanceRecord("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2", "1.2", "CT", "x", 1, "T")
    )
    jobs.settling.settle(0.0, ["ct-abdomen"])
    job = jobs.work.claim("test", 60.0)
    assert job is not None
    pacs = PacsStub(tmp_path / "pacs", free_port(), status=0xA700).start()
    try:
        destination = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=pacs.port)
        jobs.work.complete(
            job.id,
            job.token,
            series_instance_uid="1.2.3.4",
            seg_path=str(seg_file),
            seg_sop_instance_uid="9.9",
            outcome=Outcome.SEG,
            destinations=[delivery_target(destination)],
        )
        dispatcher = Dispatcher(jobs.deliveries, owner="test", calling_ae="SCPNODE")

        assert dispatcher.run_once()
        view = jobs.views.get(job.id)
        assert view is not None and view.state == "delivering"
        (delivery,) = view.deliveries
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("pending", 1, 0xA700)
        assert "0xA700" in (delivery.last_error or "")
        assert not dispatcher.run_once()  # not due before its backoff

        pacs.status = 0x0000
        clock.now += timedelta(seconds=6)
        assert dispatcher.run_once()
        view = jobs.views.get(job.id)
        assert view is not None and view.state == "done"
        assert view.deliveries[0].attempts == 2
        assert sum(pacs.received.values()) == 1
    finally:
        pacs.stop()
