"""Per-destination outputs against real pynetdicom PACS stand-ins: each (destination, object)
is its own delivery; a PACS that does not take SR fails only the SR delivery, at once."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pynetdicom.sop_class import Comprehensive3DSRStorage

from scp_node.app import build_queue, delivery_target
from scp_node.dicom.volume import load_volume
from scp_node.dispatch import Dispatcher
from scp_node.inference.registry import ModelSpec
from scp_node.metrics import NodeMetrics
from scp_node.output.seg import build_segmentation, write_segmentation
from scp_node.output.sr import build_measurement_report, measure_segments, write_measurement_report
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import DeliveryKind, Outcome
from scp_node.queue.records import InstanceRecord, OutputObject
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


@pytest.fixture(scope="module")
def outbox(
    tmp_path_factory: pytest.TempPathFactory, ct_b_files: list[Path]
) -> dict[str, OutputObject]:
    """Real objects of one result: the BINARY SEG, the LABELMAP SEG and the SR of each."""
    folder = tmp_path_factory.mktemp("outbox")
    volume = load_volume(ct_b_files)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[5:15, 200:300, 200:300] = 1
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    measured = measure_segments(volume, labels, spec)
    objects: dict[str, OutputObject] = {}
    for seg_type in ("binary", "labelmap"):
        seg = build_segmentation(volume, labels, spec, software_version="t", seg_type=seg_type)
        assert seg is not None
        seg_path = folder / f"{seg_type}-seg.dcm"
        write_segmentation(seg, seg_path)
        objects[f"{seg_type} seg"] = OutputObject(
            DeliveryKind.SEG, str(seg_path), str(seg.SOPInstanceUID)
        )
        sr = build_measurement_report(volume, seg, measured, spec, software_version="t")
        sr_path = folder / f"{seg_type}-sr.dcm"
        write_measurement_report(sr, sr_path)
        objects[f"{seg_type} sr"] = OutputObject(
            DeliveryKind.SR, str(sr_path), str(sr.SOPInstanceUID)
        )
    return objects


def test_a_pacs_without_sr_fails_only_the_sr_delivery(
    tmp_path: Path, outbox: dict[str, OutputObject]
) -> None:
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
    pacs = PacsStub(tmp_path / "pacs", free_port()).start()
    nosr = PacsStub(tmp_path / "nosr", free_port(), refuse=[Comprehensive3DSRStorage]).start()
    metrics = NodeMetrics()
    try:
        both = ("seg", "sr")
        destinations = [
            Destination(
                name="pacs",
                ae_title="PACS",
                host="127.0.0.1",
                port=pacs.port,
                outputs=both,
                seg_type="labelmap",
            ),
            Destination(
                name="nosr", ae_title="PACS", host="127.0.0.1", port=nosr.port, outputs=both
            ),
        ]
        binary = outbox["binary seg"]
        jobs.work.complete(
            job.id,
            job.token,
            series_instance_uid="1.2.3.4",
            seg_path=binary.path,
            seg_sop_instance_uid=binary.sop_instance_uid,
            outcome=Outcome.SEG,
            destinations=[delivery_target(d) for d in destinations],
            objects={
                "pacs": [outbox["labelmap seg"], outbox["labelmap sr"]],
                "nosr": [binary, outbox["binary sr"]],
            },
        )
        dispatcher = Dispatcher(jobs.deliveries, owner="t", calling_ae="SCPNODE", metrics=metrics)
        while dispatcher.run_once():
            pass

        # The PACS that takes everything holds the LABELMAP SEG and the SR about it.
        assert set(pacs.received) == {
            outbox["labelmap seg"].sop_instance_uid,
            outbox["labelmap sr"].sop_instance_uid,
        }
        sr = dcmread(pacs.directory / f"{outbox['labelmap sr'].sop_instance_uid}.dcm")
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert outbox["labelmap seg"].sop_instance_uid in referenced
        # The other got its SEG; its SR delivery failed at once, with the reason.
        assert set(nosr.received) == {binary.sop_instance_uid}
        view = jobs.views.get(job.id)
        states = {
            (d.destination, d.kind.value): (d.state.value, d.attempts) for d in view.deliveries
        }
        assert states == {
            ("pacs", "seg"): ("done", 1),
            ("pacs", "sr"): ("done", 1),
            ("nosr", "seg"): ("done", 1),
            ("nosr", "sr"): ("failed", 1),
        }
        (refused,) = [d for d in view.deliveries if d.state.value == "failed"]
        assert "accepts none of the proposed SOP classes: Comprehensive 3D SR Storage" in (
            refused.last_error or ""
        )
        assert view.state.value == "failed"
        assert (view.error or "").startswith("SR delivery to nosr refused: ")
        text = metrics.exposition().decode()
        assert 'scp_node_objects_sent_total{kind="seg"} 2.0' in text
        assert 'scp_node_objects_sent_total{kind="sr"} 1.0' in text

        # An admin retry resends only that SR (same file, same UID); refused again at once.
        jobs.admin.retry(job.id)
        while dispatcher.run_once():
            pass
        assert set(nosr.received) == {binary.sop_instance_uid}
        assert sum(pacs.received.values()) == 2
        view = jobs.views.get(job.id)
        assert view.state.value == "failed"
        assert [d.attempts for d in view.deliveries if d.kind.value == "sr"] == [1, 1]
    finally:
        pacs.stop()
        nosr.stop()
