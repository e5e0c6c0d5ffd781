"""The one client association helper (``scp_node.dicom.net``) as C-STORE, C-ECHO and C-FIND
use it, against real pynetdicom SCPs on loopback: a refused association leaves no socket open,
and C-FIND runs over TLS."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from scp_node.dicom.net import Peer, association
from scp_node.dicom.query import series_instance_counts
from scp_node.dicom.tls import client_context, server_context
from scp_node.errors import DeliveryError
from tests.support.certs import Pki, make_pki
from tests.support.datasets import ct_dataset
from tests.support.net import free_port, wait_for_port

# A Storage/Verification/Query SCP in its own process, so that every socket counted in this
# process is one of our client's. It accepts only the called AE title "PACS".
_STRICT_SCP = """
import sys
import warnings
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification,
)
ae = AE(ae_title="PACS")
ae.require_called_aet = True
for sop_class in (CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification):
    ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True)
"""


def _open_sockets() -> int:
    """Socket descriptors this process holds right now."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return count


@pytest.fixture
def strict_scp() -> Iterator[int]:
    """The port of a pynetdicom SCP in a subprocess that rejects any called AE but PACS."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _STRICT_SCP, str(port)])
    try:
        wait_for_port(port, timeout_s=30)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# The client side of the refusal test, in a fresh process of its own: every socket it counts
# is one its calls opened (threads that other tests left in the pytest process, or their
# garbage, cannot open or close one meanwhile). Prints the counts and ResourceWarnings as JSON.
_REFUSING_CLIENT = """
import gc, json, os, sys, warnings
from pydicom.uid import generate_uid
from scp_node.dicom.net import Peer
from scp_node.dicom.query import series_instance_counts
from scp_node.dicom.scu import echo, send_files
from scp_node.dicom.tls import client_context
from scp_node.errors import DeliveryError

def open_sockets():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue
    return count

def refused(call, match):
    try:
        call()
    except DeliveryError as exc:
        assert match in str(exc), exc
    else:
        raise AssertionError("association established")

path, scp_port, dead_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
right = Peer("PACS", "127.0.0.1", scp_port)
wrong = Peer("NOTPACS", "127.0.0.1", scp_port)
dead = Peer("PACS", "127.0.0.1", dead_port)
tls = client_context()
assert echo(right, timeout_s=10) == 0
attempts = [
    lambda peer: echo(peer, timeout_s=10),
    lambda peer: send_files([path], peer, timeout_s=10),
    lambda peer: series_instance_counts(peer, generate_uid(), calling_ae="SCPNODE", timeout_s=10),
]
gc.collect()
before = open_sockets()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", ResourceWarning)
    for _ in range(3):
        for attempt in attempts:
            for peer in (wrong, dead):
                refused(lambda: attempt(peer), "not established")
        refused(lambda: echo(dead, timeout_s=10, ssl_context=tls), "over TLS not established")
        refused(
            lambda: series_instance_counts(
                right, generate_uid(), calling_ae="SCPNODE", timeout_s=10, ssl_context=tls
            ),
            "over TLS not established",
        )
    inside = open_sockets()
    gc.collect()
after = open_sockets()
warned = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
print(json.dumps({"before": before, "inside": inside, "after": after, "warnings": warned}))
"""


def test_a_refused_association_leaves_no_socket_open(strict_scp: int, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ct_dataset().save_as(path, enforce_file_format=True)
    # The SCP is reachable and answers for the right AE title (the client checks with an
    # echo first): the rejections are about the called AE; nothing listens on the dead port.
    result = subprocess.run(
        [sys.executable, "-c", _REFUSING_CLIENT, str(path), str(strict_scp), str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    # pynetdicom leaves a refused connection's socket to the garbage collector, which closes
    # it late and says so with a ResourceWarning: we must have closed it first.
    assert counts["warnings"] == []
    assert counts["inside"] == counts["before"]
    assert counts["after"] == counts["before"]


def test_the_helper_closes_the_socket_after_a_release(strict_scp: int) -> None:
    gc.collect()  # earlier tests' garbage sockets must not close while we count
    before = _open_sockets()
    peer = Peer("PACS", "127.0.0.1", strict_scp)
    with association(
        peer,
        [(StudyRootQueryRetrieveInformationModelFind, ["1.2.840.10008.1.2"])],
        calling_ae="SCPNODE",
        timeout_s=10,
    ) as assoc:
        assert assoc.is_established
        assert _open_sockets() == before + 1
    assert not assoc.is_established
    assert _open_sockets() == before


def test_too_many_presentation_contexts_are_refused_before_connecting() -> None:
    contexts = [(f"1.2.3.{i}", ["1.2.840.10008.1.2"]) for i in range(129)]
    peer = Peer("PACS", "127.0.0.1", 1)
    with (
        pytest.raises(DeliveryError, match="129 presentation contexts"),
        association(peer, contexts, calling_ae="A", timeout_s=1),
    ):
        pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_c_find_runs_over_tls(pki: Pki) -> None:
    study = generate_uid()
    series = {generate_uid(): 3, generate_uid(): 120}
    asked: list[str] = []

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        asked.append(str(identifier.StudyInstanceUID))
        for uid, count in series.items():
            answer = Dataset()
            answer.QueryRetrieveLevel = "SERIES"
            answer.StudyInstanceUID = identifier.StudyInstanceUID
            answer.SeriesInstanceUID = uid
            answer.NumberOfSeriesRelatedInstances = count
            yield 0xFF00, answer

    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_FIND, on_find)],
        ssl_context=server_context(
            pki.server_cert, pki.server_key, ca_file=pki.ca_cert, require_client_cert=True
        ),
    )
    peer = Peer("PACS", "127.0.0.1", port)
    try:
        ours = client_context(
            ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key
        )
        counts = series_instance_counts(peer, study, calling_ae="SCPNODE", ssl_context=ours)
        assert counts == series
        assert asked == [study]
        with pytest.raises(DeliveryError, match="not established"):
            series_instance_counts(peer, study, calling_ae="SCPNODE", timeout_s=5)  # plain TCP
        with pytest.raises(DeliveryError, match="over TLS not established"):
            # No client certificate: the SCP requires one.
            series_instance_counts(
                peer,
                study,
                calling_ae="SCPNODE",
                timeout_s=5,
                ssl_context=client_context(ca_file=pki.ca_cert),
            )
        assert asked == [study]
    finally:
        server.shutdown()
