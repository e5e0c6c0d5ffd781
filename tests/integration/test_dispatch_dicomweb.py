"""Dispatch to a DICOMweb (STOW-RS) destination: a real Orthanc with its DICOMweb plugin.

Same contract as C-STORE: a failure is recorded and retried with backoff, success ends the
delivery, and sending the same SEG again replaces it (one instance at the PACS).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from scp_node.app import build_queue, delivery_target
from scp_node.dicom.stow import stow_files
from scp_node.dicom.volume import load_volume
from scp_node.dispatch import Dispatcher
from scp_node.errors import ConfigError, DeliveryError
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import Outcome
from scp_node.queue.records import InstanceRecord
from scp_node.queue.retry import RetryPolicy
from scp_node.settings import Destination, load_settings
from tests.conftest import REPO_ROOT
from tests.support.orthanc import OrthancServer


class Clock:
    """A clock the test moves by hand, so backoff needs no sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(scope="module")
def seg_file(tmp_path_factory: pytest.TempPathFactory, ct_b_files: list[Path]) -> Path:
    volume = load_volume(ct_b_files)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[5:15, 200:300, 200:300] = 1
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    seg = build_segmentation(volume, labels, spec, software_version="test")
    assert seg is not None
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    write_segmentation(seg, path)
    return path


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """Made, not started: the test decides when it comes up."""
    server = OrthancServer(tmp_path / "orthanc", modalities={})
    yield server
    server.stop()


def _instances(orthanc: OrthancServer) -> list[str]:
    return list(orthanc.get("/instances"))


def test_stow_delivery_retries_until_orthanc_is_up_and_resends_idempotently(
    tmp_path: Path, seg_file: Path, orthanc: OrthancServer
) -> None:
    clock = Clock()
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    jobs = build_queue(engine, RetryPolicy(3, 5.0, 60.0, 2.0, 3600.0), clock)
    destination = Destination(name="web", kind="dicomweb", url=orthanc.dicomweb_url)
    dispatcher = Dispatcher(jobs.deliveries, owner="test", calling_ae="SCPNODE", timeout_s=10.0)
    seg_uid = str(dcmread(seg_file, stop_before_pixels=True).SOPInstanceUID)

    def run_job(sop: str) -> int:
        jobs.intake.record_instance(
            InstanceRecord("1.2.3", "1.2.3.4", sop, "1.2", "1.2", "CT", "x", 1, "T")
        )
        clock.now += timedelta(seconds=60)
        jobs.settling.settle(0.0, ["ct-abdomen"])
        job = jobs.work.claim("test", 60.0)
        assert job is not None
        jobs.work.complete(
            job.id,
            job.token,
            series_instance_uid="1.2.3.4",
            seg_path=str(seg_file),
            seg_sop_instance_uid=seg_uid,
            outcome=Outcome.SEG,
            destinations=[delivery_target(destination)],
        )
        return job.id

    first = run_job("1.2.3.4.5")
    # Orthanc is not running yet: the attempt fails and is kept for a retry.
    assert dispatcher.run_once()
    view = jobs.views.get(first)
    assert view.state == "delivering"
    (delivery,) = view.deliveries
    assert (delivery.state, delivery.attempts, delivery.url) == ("pending", 1, orthanc.dicomweb_url)
    assert "STOW-RS" in (delivery.last_error or "")
    assert not dispatcher.run_once()  # not due before its backoff

    orthanc.start()
    clock.now += timedelta(seconds=6)
    assert dispatcher.run_once()
    view = jobs.views.get(first)
    assert view.state == "done"
    assert view.deliveries[0].attempts == 2
    assert view.deliveries[0].to_json()["url"] == orthanc.dicomweb_url
    (stored,) = _instances(orthanc)
    assert orthanc.get(f"/instances/{stored}")["MainDicomTags"]["SOPInstanceUID"] == seg_uid

    # A new job of the same study sends the same SEG again: still one instance at the PACS.
    second = run_job("1.2.3.4.6")
    assert dispatcher.run_once()
    view = jobs.views.get(second)
    assert view.state == "done"
    assert _instances(orthanc) == [stored]


def test_stow_reports_http_errors_with_the_status(tmp_path: Path, seg_file: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={}).start()
    try:
        with pytest.raises(DeliveryError, match=r"HTTP 404"):
            stow_files([seg_file], orthanc.url + "/no-such-root", timeout_s=10.0)
        (result,) = stow_files([seg_file], orthanc.dicomweb_url, timeout_s=10.0)
        assert result.ok and result.status == 0x0000
    finally:
        orthanc.stop()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"name": "a", "host": "h", "port": 104}, 'ae_title is required for kind = "dimse"'),
        ({"name": "a", "ae_title": "A", "port": 104}, 'host is required for kind = "dimse"'),
        ({"name": "a", "kind": "dicomweb"}, 'url is required for kind = "dicomweb"'),
        (
            {"name": "a", "ae_title": "A", "host": "h", "port": 1, "url": "http://x/dicom-web"},
            'url is only used with kind = "dicomweb"',
        ),
        ({"name": "a", "kind": "dicomweb", "url": "ftp://x"}, "url"),
    ],
)
def test_destination_validation_names_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Destination.model_validate(values)


def test_config_file_error_names_the_destination_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[[destinations]]\nname = 'web'\nkind = 'dicomweb'\n")
    with pytest.raises(ConfigError, match=r"destinations\.0\.url: .*required"):
        load_settings(path)
    path.write_text("[[destinations]]\nname = 'web'\nkind = 'dicomweb'\nurl = 'http://h/dw'\n")
    (web,) = load_settings(path).destinations
    assert (web.kind, web.url, web.ae_title) == ("dicomweb", "http://h/dw", None)
