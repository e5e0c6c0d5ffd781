"""A series that grows after its SEG went out, through the real worker and dispatcher to a
real Orthanc (IOCM, verify) and a pynetdicom archive; and a PACS that says it stored a SEG
it did not keep, caught by verify."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    SegmentationStorage,
    StudyRootQueryRetrieveInformationModelFind,
)

from scp_node.app import Database, build_queue
from scp_node.dispatch import Dispatcher
from scp_node.inference.pool import ModelPool
from scp_node.queue import (
    DeliveryKind,
    DeliveryState,
    DeliveryTarget,
    JobState,
    Outcome,
    RetryPolicy,
    make_engine,
    upgrade,
)
from scp_node.worker import Worker, WorkerConfig
from tests.conftest import REPO_ROOT
from tests.support.net import PacsStub, free_port
from tests.support.orthanc import OrthancServer
from tests.support.records import record_file

CALLING_AE = "SCPNODE"
MODEL = "ct-abdomen"
FIRST_PART = 14


class Clock:
    """A clock the test moves by hand, so backoff needs no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class BoxModel:
    """Stands in for the network (the node's model code is tested elsewhere): a box of
    label 1 on every slice, so every slice has a frame."""

    device = "cpu"

    def predict(self, image: np.ndarray, spacing_zyx: Any, direction: Any = None) -> np.ndarray:
        labels = np.zeros(image.shape, dtype=np.uint8)
        labels[:, 200:300, 200:300] = 1
        return labels


class ForgetfulPacs:
    """A PACS that answers success to every C-STORE without keeping anything, and whose
    C-FIND therefore finds nothing."""

    def __init__(self, port: int, ae_title: str = "FORGETFUL") -> None:
        self.port = port
        self.ae_title = ae_title
        self.stored = 0
        self.queries = 0
        self._ae = AE(ae_title=ae_title)
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        self._ae.add_supported_context(SegmentationStorage, syntaxes)
        self._ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind, syntaxes)

    def _on_store(self, event: Any) -> int:
        self.stored += 1
        return 0x0000

    def _on_find(self, event: Any) -> Iterator[tuple[int, Any]]:
        self.queries += 1
        yield from ()

    def __enter__(self) -> ForgetfulPacs:
        self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_FIND, self._on_find)],
        )
        return self

    def __exit__(self, *_exc: object) -> None:
        self._ae.shutdown()


def _by_z(files: list[Path]) -> list[Path]:
    return sorted(
        files,
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )


def _record(queue: Database, path: Path) -> None:
    record_file(queue.intake, path, "ORTHANC")


def _dispatch_all(dispatcher: Dispatcher) -> None:
    while dispatcher.run_once():
        pass


def _orthanc_instances(orthanc: OrthancServer) -> dict[str, list[pydicom.Dataset]]:
    """Modality -> the instances Orthanc holds (headers)."""
    held: dict[str, list[pydicom.Dataset]] = {}
    for study_id in orthanc.get("/studies"):
        for series in orthanc.study_series(str(study_id)):
            modality = str(series["MainDicomTags"].get("Modality"))
            for instance in orthanc.series_instances(str(series["ID"])):
                data = orthanc.instance_file(str(instance["ID"]))
                held.setdefault(modality, []).append(
                    pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
                )
    return held


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[tuple[Database, Clock]]:
    clock = Clock()
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    yield build_queue(engine, RetryPolicy(3, 5.0, 60.0, 2.0, 3600.0), clock), clock
    engine.dispose()


@pytest.mark.slow
def test_growing_series_retracts_the_old_seg_only_where_it_landed(
    tmp_path: Path, ct_b_files: list[Path], queue: tuple[Database, Clock]
) -> None:
    db, clock = queue
    orthanc = OrthancServer(
        tmp_path / "orthanc", modalities={"node": (CALLING_AE, "127.0.0.1", free_port())}
    ).start()
    archive = PacsStub(tmp_path / "archive", free_port(), ae_title="ARCHIVE", status=0xA700)
    archive.start()
    try:
        dests = (
            DeliveryTarget(
                "pacs",
                orthanc.ae_title,
                "127.0.0.1",
                orthanc.dicom_port,
                supersede="iocm",
                verify=True,
            ),
            DeliveryTarget("archive", "ARCHIVE", "127.0.0.1", archive.port, supersede="iocm"),
        )
        pool = ModelPool(REPO_ROOT / "models", [MODEL], lambda _spec: BoxModel())
        worker = Worker(
            db.work,
            pool,
            WorkerConfig("w", tmp_path / "outbox", dests, 600.0, 300.0, "test"),
        )
        dispatcher = Dispatcher(
            db.deliveries, owner="d", calling_ae=CALLING_AE, verify_destinations=["pacs"]
        )
        files = _by_z(ct_b_files)

        # First part: the SEG lands at the PACS (verified); the archive refuses it.
        for path in files[:FIRST_PART]:
            _record(db, path)
        (first,) = db.settling.settle(0.0, [MODEL])
        assert worker.run_once()
        _dispatch_all(dispatcher)
        old = db.views.get(first)
        assert old.seg_instance_number == 1
        states = {d.destination: d.state for d in old.deliveries}
        assert states == {"pacs": DeliveryState.DONE, "archive": DeliveryState.PENDING}

        # Second part: a new SEG; the archive's waiting old SEG is dropped; a note goes to
        # the PACS only, and only after the new SEG is there.
        clock.now += timedelta(seconds=1)
        for path in files[FIRST_PART:]:
            _record(db, path)
        (second,) = db.settling.settle(0.0, [MODEL])
        assert worker.run_once()
        archive.status = 0x0000
        clock.now += timedelta(seconds=10)
        _dispatch_all(dispatcher)

        old, new = db.views.get(first), db.views.get(second)
        assert old.state is JobState.DONE and new.state is JobState.DONE, new.error
        assert new.outcome is Outcome.SEG
        assert new.seg_instance_number == 2
        assert new.seg_series_instance_uid == old.seg_series_instance_uid
        assert new.seg_sop_instance_uid != old.seg_sop_instance_uid
        assert new.supersedes is not None and new.supersedes.job_id == first
        assert old.superseded_by is not None and old.superseded_by.job_id == second
        dropped = next(d for d in old.deliveries if d.destination == "archive")
        assert dropped.state is DeliveryState.FAILED
        assert dropped.last_error == (
            f"superseded by {new.seg_sop_instance_uid} (job {second}) before delivery"
        )
        kinds = sorted((d.kind, d.destination, d.state) for d in new.deliveries)
        assert kinds == [
            (DeliveryKind.KOS, "pacs", DeliveryState.DONE),
            (DeliveryKind.SEG, "archive", DeliveryState.DONE),
            (DeliveryKind.SEG, "pacs", DeliveryState.DONE),
        ]
        story = [e.message for e in db.views.events_after(0, job_id=second)]
        seg_at_pacs = story.index("delivered to pacs (attempt 1)")
        note_at_pacs = next(
            i for i, m in enumerate(story) if m.startswith("rejection note") and "delivered" in m
        )
        assert seg_at_pacs < note_at_pacs  # the note only after the SEG landed

        held = _orthanc_instances(orthanc)
        segs = {str(s.SOPInstanceUID): s for s in held["SEG"]}
        assert set(segs) == {old.seg_sop_instance_uid, new.seg_sop_instance_uid}
        assert int(segs[str(new.seg_sop_instance_uid)].InstanceNumber) == 2
        (kos,) = held["KO"]
        (ref,) = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.seg_sop_instance_uid
        assert list(archive.received) == [new.seg_sop_instance_uid]  # no note, no old SEG

        # Retry of the unchanged job: the same instance again, no new note, and the PACS
        # still holds exactly one instance per UID.
        db.admin.retry(second)
        assert worker.run_once()
        _dispatch_all(dispatcher)
        again = db.views.get(second)
        assert again.state is JobState.DONE
        assert (again.seg_sop_instance_uid, again.seg_instance_number) == (
            new.seg_sop_instance_uid,
            2,
        )
        assert [d.kind for d in again.deliveries] == [DeliveryKind.SEG, DeliveryKind.SEG]
        held = _orthanc_instances(orthanc)
        uids = [str(s.SOPInstanceUID) for s in held["SEG"] + held["KO"]]
        assert sorted(uids) == sorted(set(uids)) and len(uids) == 3
        assert archive.received[str(new.seg_sop_instance_uid)] == 2
    finally:
        archive.stop()
        orthanc.stop()


def test_verify_fails_a_store_the_pacs_did_not_keep(
    tmp_path: Path, ct_b_files: list[Path], queue: tuple[Database, Clock]
) -> None:
    db, clock = queue
    with ForgetfulPacs(free_port()) as pacs:
        dest = DeliveryTarget("pacs", pacs.ae_title, "127.0.0.1", pacs.port, verify=True)
        pool = ModelPool(REPO_ROOT / "models", [MODEL], lambda _spec: BoxModel())
        worker = Worker(
            db.work,
            pool,
            WorkerConfig("w", tmp_path / "outbox", (dest,), 600.0, 300.0, "test"),
        )
        for path in ct_b_files:
            _record(db, path)
        (job_id,) = db.settling.settle(0.0, [MODEL])
        assert worker.run_once()
        dispatcher = Dispatcher(
            db.deliveries, owner="d", calling_ae=CALLING_AE, verify_destinations=["pacs"]
        )
        assert dispatcher.run_once()
        assert (pacs.stored, pacs.queries) == (1, 1)
        view = db.views.get(job_id)
        assert view.state is JobState.DELIVERING  # never "done" unverified
        (delivery,) = view.deliveries
        assert delivery.state is DeliveryState.PENDING and delivery.attempts == 1
        assert (delivery.last_error or "").startswith("stored but not verified: C-FIND at")
        assert "does not list the instance" in (delivery.last_error or "")
        assert not dispatcher.run_once()  # retried after its backoff, like any failure

        # What verify prevents: without it the same answer counts as delivered.
        clock.now += timedelta(seconds=10)
        unverified = Dispatcher(db.deliveries, owner="d2", calling_ae=CALLING_AE)
        assert unverified.run_once()
        assert pacs.stored == 2 and pacs.queries == 1
        assert db.views.get(job_id).state is JobState.DONE
