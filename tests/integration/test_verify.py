"""Delivery verification against a real Orthanc: C-FIND at IMAGE level and QIDO-RS."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from scp_node.dicom.reference import InstanceReference
from scp_node.dicom.scu import Peer, send_files
from scp_node.dicom.verify import VerifyOutcome, verify_dicomweb, verify_dimse
from scp_node.dicom.volume import load_volume
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation
from tests.conftest import REPO_ROOT
from tests.support.net import free_port
from tests.support.orthanc import OrthancServer

#: The AE Orthanc knows (its DicomModalities), so it answers our C-FIND.
CALLING_AE = "SCPNODE"
UNKNOWN_SOP = "2.25.1234567890"


@pytest.fixture(scope="module")
def stored(
    tmp_path_factory: pytest.TempPathFactory, ct_b_files: list[Path]
) -> Iterator[tuple[OrthancServer, InstanceReference]]:
    """An Orthanc that got one SEG of subject B by C-STORE, and that SEG's reference."""
    root = tmp_path_factory.mktemp("verify")
    volume = load_volume(ct_b_files)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[5:15, 200:300, 200:300] = 1
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    seg = build_segmentation(volume, labels, spec, software_version="test")
    assert seg is not None
    path = root / "seg.dcm"
    write_segmentation(seg, path)
    orthanc = OrthancServer(
        root / "orthanc", modalities={"node": (CALLING_AE, "127.0.0.1", free_port())}
    ).start()
    try:
        peer = Peer(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)
        (result,) = send_files([path], peer, calling_ae=CALLING_AE, timeout_s=30)
        assert result.ok, result
        yield orthanc, InstanceReference.from_dataset(dcmread(path, stop_before_pixels=True))
    finally:
        orthanc.stop()


def _peer(orthanc: OrthancServer) -> Peer:
    return Peer(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)


def test_c_find_finds_the_stored_seg(stored: tuple[OrthancServer, InstanceReference]) -> None:
    orthanc, seg = stored
    result = verify_dimse(_peer(orthanc), seg, calling_ae=CALLING_AE, timeout_s=30)
    assert result.outcome is VerifyOutcome.FOUND, result
    assert result.found


def test_c_find_does_not_find_an_unknown_uid(
    stored: tuple[OrthancServer, InstanceReference],
) -> None:
    orthanc, seg = stored
    for unknown in (
        replace(seg, sop_instance_uid=UNKNOWN_SOP),
        replace(seg, study_instance_uid="2.25.1", series_instance_uid="2.25.2"),
    ):
        result = verify_dimse(_peer(orthanc), unknown, calling_ae=CALLING_AE, timeout_s=30)
        assert result.outcome is VerifyOutcome.NOT_FOUND, result
        assert not result.found


def test_qido_finds_the_stored_seg(stored: tuple[OrthancServer, InstanceReference]) -> None:
    orthanc, seg = stored
    result = verify_dicomweb(orthanc.dicomweb_url, seg, timeout_s=30)
    assert result.outcome is VerifyOutcome.FOUND, result


def test_qido_does_not_find_an_unknown_uid(
    stored: tuple[OrthancServer, InstanceReference],
) -> None:
    orthanc, seg = stored
    for unknown in (
        replace(seg, sop_instance_uid=UNKNOWN_SOP),
        replace(seg, study_instance_uid="2.25.1", series_instance_uid="2.25.2"),
    ):
        result = verify_dicomweb(orthanc.dicomweb_url, unknown, timeout_s=30)
        assert result.outcome is VerifyOutcome.NOT_FOUND, result


def test_could_not_ask_says_why(stored: tuple[OrthancServer, InstanceReference]) -> None:
    orthanc, seg = stored
    # (A closed port is not tried here: pynetdicom leaks the socket of a refused connect,
    # which fails the run with a ResourceWarning; that belongs to the association code.)
    # Orthanc answers C-FIND only to the AEs of its DicomModalities.
    result = verify_dimse(_peer(orthanc), seg, calling_ae="STRANGER", timeout_s=30)
    assert result.outcome is VerifyOutcome.COULD_NOT_ASK, result
    # Orthanc accepts the association, then aborts it instead of answering.
    assert "no C-FIND response" in result.reason, result

    result = verify_dicomweb(f"{orthanc.url}/no-such-root", seg, timeout_s=30)
    assert result.outcome is VerifyOutcome.COULD_NOT_ASK
    assert "HTTP 404" in result.reason

    result = verify_dicomweb(f"http://127.0.0.1:{free_port()}/dicom-web", seg, timeout_s=5)
    assert result.outcome is VerifyOutcome.COULD_NOT_ASK
    assert "failed" in result.reason
