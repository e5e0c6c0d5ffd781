"""DICOM over TLS and the source-address allow-list, with real peers on loopback: dcmtk's
``storescu +tls`` into ``scp-node receive``, our SCU and dispatcher into a TLS pynetdicom SCP.
Certificates are made by ``openssl`` for each test session."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from typer.testing import CliRunner

from scp_node.cli import app
from scp_node.dicom.access import SourceAllowList
from scp_node.dicom.handlers import StoreContext
from scp_node.dicom.scp import StorageServer, build_storage_ae
from scp_node.dicom.scu import Peer, echo, send_files
from scp_node.dicom.tls import client_context, server_context
from scp_node.errors import ConfigError, DeliveryError
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.intake import Intake
from scp_node.spool import Spool
from tests.support.certs import Pki, make_pki
from tests.support.cluster import NodeProc
from tests.support.config import write_config
from tests.support.net import free_port, wait_until
from tests.support.pacs import TlsPacsStub
from tests.support.seeded import instance_rows, job_state, make_seg, seed_delivering_job

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _storescu(port: int, files: list[Path], *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-xv", *tls, "-aec", "SCPNODE", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )


@pytest.mark.slow  # a receive process, dcmtk runs and openssl certificates: ~7 s
def test_tls_node_takes_dcmtk_tls_and_refuses_plain_and_untrusted(
    tmp_path: Path, pki: Pki, ct_b_files: list[Path]
) -> None:
    port = free_port()
    tls = {
        "enabled": True,
        "cert_file": str(pki.server_cert),
        "key_file": str(pki.server_key),
        "ca_file": str(pki.ca_cert),
        "require_client_cert": True,
    }
    config = write_config(
        tmp_path,
        port,
        free_port(),
        tls=tls,
        # Two receiver processes: the TLS and address rules hold in each.
        node={"allowed_source_ips": ["127.0.0.0/8", "::1"], "receivers": 2},
        settle={"quiet_s": 600.0, "poll_s": 1.0},
    )
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    node = NodeProc("receive", config, tmp_path, "receive", port=port).start()
    # A client that connects and says nothing must not hold up the TLS handshakes of others.
    idle = socket.create_connection(("127.0.0.1", port))
    try:
        first, second, third = ct_b_files[:3], ct_b_files[3:6], ct_b_files[6:8]
        key_cert = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca_cert)]
        done = _storescu(port, first, *key_cert)
        assert done.returncode == 0, done.stderr
        assert len(list((tmp_path / "spool").rglob("*.dcm"))) == len(first)

        plain = _storescu(port, second)
        assert plain.returncode != 0
        untrusted = ["+tls", str(pki.rogue_key), str(pki.rogue_cert), "+cf", str(pki.ca_cert)]
        rogue = _storescu(port, second, *untrusted)
        assert rogue.returncode != 0
        assert len(list((tmp_path / "spool").rglob("*.dcm"))) == len(first)
        assert instance_rows(db_url) == len(first)

        # Our own SCU, with the client certificate, over TLS to our own SCP.
        context = client_context(
            ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key
        )
        peer = Peer("SCPNODE", "127.0.0.1", port)
        assert echo(peer, ssl_context=context) == 0
        results = send_files(third, peer, calling_ae="SENDER", ssl_context=context)
        assert all(r.ok for r in results), results
        assert instance_rows(db_url) == len(first) + len(third)
    finally:
        idle.close()
        assert node.stop() == 0
    stored = {p.stem for p in (tmp_path / "spool").rglob("*.dcm")}
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in first + third}
    assert stored == sent
    assert not (tmp_path / "quarantine").exists() or not any((tmp_path / "quarantine").iterdir())


def test_our_scu_speaks_tls_to_a_pynetdicom_scp(
    tmp_path: Path, pki: Pki, ct_b_files: list[Path]
) -> None:
    context = server_context(
        pki.server_cert, pki.server_key, ca_file=pki.ca_cert, require_client_cert=True
    )
    pacs = TlsPacsStub(tmp_path / "pacs", free_port(), context).start()
    peer = Peer("PACS", "127.0.0.1", pacs.port)
    try:
        ours = client_context(
            ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key
        )
        assert echo(peer, ssl_context=ours) == 0
        results = send_files(ct_b_files[:2], peer, ssl_context=ours)
        assert [r.ok for r in results] == [True, True], results
        assert len(pacs.received) == 2

        with pytest.raises(DeliveryError, match="not established"):
            send_files(ct_b_files[2:3], peer, timeout_s=5)  # plain TCP to a TLS port
        no_cert = client_context(ca_file=pki.ca_cert)
        with pytest.raises(DeliveryError, match="TLS"):
            echo(peer, ssl_context=no_cert, timeout_s=5)  # the SCP wants a client certificate
        with pytest.raises(DeliveryError):
            echo(peer, ssl_context=client_context(ca_file=pki.rogue_cert), timeout_s=5)
        assert len(pacs.received) == 2
    finally:
        pacs.stop()


@pytest.mark.slow  # a dispatch process and a SEG built from subject B: ~10 s
def test_dispatcher_sends_to_a_tls_destination(
    tmp_path: Path, pki: Pki, ct_b_files: list[Path]
) -> None:
    context = server_context(
        pki.server_cert, pki.server_key, ca_file=pki.ca_cert, require_client_cert=True
    )
    pacs = TlsPacsStub(tmp_path / "pacs", free_port(), context).start()
    tls = {
        "ca_file": str(pki.ca_cert),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }
    destination = {
        "name": "secure-pacs",
        "ae_title": "PACS",
        "host": "127.0.0.1",
        "port": pacs.port,
        "tls": True,
    }
    config = write_config(tmp_path, free_port(), pacs.port, destinations=[destination], tls=tls)
    job_id, seg_uid = seed_delivering_job(config, make_seg(ct_b_files, tmp_path / "seg.dcm"))
    dispatch = NodeProc("dispatch", config, tmp_path, "dispatch").start(wait=False)
    try:
        wait_until(lambda: job_state(config, job_id) == "done", 90, "the TLS delivery")
    finally:
        dispatch.stop()
        pacs.stop()
    assert dict(pacs.received) == {seg_uid: 1}


def _scp(tmp_path: Path, allowed_source_ips: list[str]) -> tuple[StorageServer, Spool]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    spool = Spool(tmp_path / "spool")
    ctx = StoreContext(spool, Intake(engine), 0)
    server = StorageServer(
        build_storage_ae("SCPNODE"),
        "127.0.0.1",
        free_port(),
        ctx,
        allowed_source_ips=allowed_source_ips,
    )
    return server, spool


def test_source_address_outside_the_allow_list_is_rejected_at_association(
    tmp_path: Path, ct_b_files: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    server, spool = _scp(tmp_path / "closed", ["10.0.0.0/8", "192.168.1.7"])
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    try:
        with caplog.at_level(logging.WARNING, logger="scp_node.dicom.access"):
            assoc = ae.associate("127.0.0.1", server.port, ae_title="SCPNODE")
            assert assoc.is_rejected and not assoc.is_established
        wait_until(lambda: "source address not allowed" in caplog.text, 10, "the log line")
        record = next(r for r in caplog.records if "source address" in r.getMessage())
        assert getattr(record, "peer", "").startswith("127.0.0.1:")
        assert not list(spool.root.rglob("*.dcm"))
    finally:
        server.stop(grace_s=1)

    server, spool = _scp(tmp_path / "open", ["127.0.0.1/32"])
    try:
        assoc = ae.associate("127.0.0.1", server.port, ae_title="SCPNODE")
        assert assoc.is_established
        assoc.release()
    finally:
        server.stop(grace_s=1)


def test_source_allow_list_matching() -> None:
    allow = SourceAllowList(["10.0.0.0/8", "::1", "192.168.1.7"])
    assert allow.allows("10.2.3.4") and allow.allows("192.168.1.7") and allow.allows("::1")
    assert allow.allows("::ffff:10.9.9.9")  # IPv4-mapped IPv6
    assert not allow.allows("127.0.0.1") and not allow.allows("192.168.1.8")
    assert not allow.allows("not-an-address")
    assert SourceAllowList([]).allows("203.0.113.5")
    with pytest.raises(ValueError):
        SourceAllowList(["10.0.0.0/33"])


def test_tls_files_that_do_not_load_are_config_errors(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match=r"tls\.cert_file"):
        server_context(tmp_path / "missing.crt", pki.server_key)
    with pytest.raises(ConfigError, match=r"tls\.ca_file"):
        client_context(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"tls\.cert_file"):
        server_context(pki.server_cert, pki.client_key)  # key of another certificate


def test_cli_echo_and_send_over_tls(tmp_path: Path, pki: Pki, ct_b_files: list[Path]) -> None:
    context = server_context(
        pki.server_cert, pki.server_key, ca_file=pki.ca_cert, require_client_cert=True
    )
    pacs = TlsPacsStub(tmp_path / "pacs", free_port(), context).start()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[tls]\nca_file = "{pki.ca_cert}"\ncert_file = "{pki.client_cert}"\n'
        f'key_file = "{pki.client_key}"\n'
    )
    peer = f"PACS@127.0.0.1:{pacs.port}"
    runner = CliRunner()
    try:
        tls = ["--tls", "--config", str(config)]
        assert runner.invoke(app, ["echo", peer, *tls]).exit_code == 0
        sent = runner.invoke(app, ["send", *map(str, ct_b_files[:2]), "--to", peer, *tls])
        assert sent.exit_code == 0, sent.output
        assert len(pacs.received) == 2
        plain = runner.invoke(app, ["echo", peer])  # no --tls: the TLS port refuses it
        assert plain.exit_code == 1 and "not established" in plain.output
    finally:
        pacs.stop()
