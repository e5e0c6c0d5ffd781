"""DICOMweb destinations that need credentials, against real services on loopback.

HTTP basic: a real Orthanc with ``AuthenticationEnabled`` and ``RegisteredUsers``. Bearer
tokens (static and OAuth2 client credentials): Orthanc cannot check them without its
authorization plugin (not packaged for Debian), so a small token endpoint + bearer-checking
gateway (``tests/support/oauth.py``) sits in front of an anonymous Orthanc; the SEG still
lands in Orthanc. A refused secret never shows in the error, the job's events, the logs,
``scp-node jobs show`` or the dashboard.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import certifi
import numpy as np
import pytest
from pydicom import dcmread
from starlette.testclient import TestClient
from typer.testing import CliRunner

from scp_node.app import Database, build_queue, delivery_target
from scp_node.cli import app as cli
from scp_node.dicom.stow import stow_files
from scp_node.dicom.volume import load_volume
from scp_node.dicom.webauth import web_session
from scp_node.dispatch import Dispatcher
from scp_node.errors import DeliveryError
from scp_node.inference.registry import ModelSpec
from scp_node.metrics import NodeMetrics
from scp_node.output.seg import build_segmentation, write_segmentation
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import Outcome
from scp_node.queue.records import InstanceRecord
from scp_node.queue.retry import RetryPolicy
from scp_node.settings import Destination, Settings, TlsSection, WebSection, load_settings
from scp_node.web import NodeRuntime, create_app
from tests.conftest import REPO_ROOT
from tests.support.certs import Pki, make_pki
from tests.support.oauth import Ticker, TokenGateway
from tests.support.orthanc import OrthancServer

PASSWORD = "right-pw-7f3c9a"
WRONG_PASSWORD = "wrong-pw-5e1b2d"
CLIENT_SECRET = "client-secret-c0ffee42"
WRONG_CLIENT_SECRET = "not-the-secret-9d8e7f"
STATIC_TOKEN = "static-token-a1b2c3d4"


class Clock:
    """Wall clock of the job table, moved by hand so backoff needs no sleeping."""

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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "orthanc", modalities={}).start()
    yield server
    server.stop()


@pytest.fixture
def ticker() -> Ticker:
    return Ticker()


@pytest.fixture
def gateway(orthanc: OrthancServer, ticker: Ticker) -> Iterator[TokenGateway]:
    server = TokenGateway(
        orthanc.url,
        "scp-node",
        CLIENT_SECRET,
        ticker,
        expires_in_s=300,
        static_tokens=frozenset({STATIC_TOKEN}),
    ).start()
    yield server
    server.stop()


def _config(tmp_path: Path, destination: dict[str, Any]) -> Path:
    """A config.toml with the job table and one DICOMweb destination (dotted auth keys)."""
    database = f"sqlite:///{tmp_path / 'node.db'}"
    lines = [
        "[database]",
        f"url = {json.dumps(database)}",
        "[[destinations]]",
        *(f"{key} = {json.dumps(value)}" for key, value in destination.items()),
    ]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _queue(settings: Settings, clock: Clock) -> Database:
    engine = make_engine(settings.database.url)
    upgrade(engine)
    return build_queue(engine, RetryPolicy(3, 5.0, 60.0, 2.0, 3600.0), clock)


def _job_with_delivery(
    jobs: Database, clock: Clock, destination: Destination, seg_file: Path
) -> int:
    """A finished job whose SEG waits for delivery to ``destination``."""
    jobs.intake.record_instance(
        InstanceRecord("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2", "1.2", "CT", "x", 1, "T")
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
        seg_sop_instance_uid=str(dcmread(seg_file, stop_before_pixels=True).SOPInstanceUID),
        outcome=Outcome.SEG,
        destinations=[delivery_target(destination)],
    )
    return job.id


def _sop_uids(orthanc: OrthancServer) -> list[str]:
    return [
        orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
        for i in orthanc.get("/instances")
    ]


def _assert_hidden(
    secrets: list[str],
    *,
    jobs: Database,
    job_id: int,
    config: Path,
    caplog: pytest.LogCaptureFixture,
    expected_error: str,
) -> None:
    """The job's error says why; no secret is in it, its events, the logs, ``scp-node jobs
    show`` (text and JSON) or the dashboard's job page."""
    view = jobs.views.get(job_id)
    (delivery,) = view.deliveries
    assert expected_error in (delivery.last_error or "")
    events = [e.to_json() for e in jobs.views.events_after(0, job_id=job_id)]
    runner = CliRunner()
    shown = runner.invoke(cli, ["jobs", "--config", str(config), "show", str(job_id)])
    shown_json = runner.invoke(
        cli, ["jobs", "--config", str(config), "show", str(job_id), "--json"]
    )
    assert shown.exit_code == 0 and shown_json.exit_code == 0, shown.output
    assert "HTTP 401" in shown.output
    dashboard = create_app(
        jobs.views,
        jobs.admin,
        WebSection(host="127.0.0.1", port=0),
        NodeRuntime(spool_dir=config.parent, min_free_bytes=0),
        NodeMetrics(),
        stop=threading.Event(),
    )
    with TestClient(dashboard) as client:
        page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and "HTTP 401" in page.text
    logs = [json.dumps(vars(r), default=str) + r.getMessage() for r in caplog.records]
    assert any(expected_error in line for line in logs)
    seen = "\n".join(
        [
            json.dumps(view.to_json(), default=str),
            json.dumps(events),
            shown.output,
            shown_json.output,
            page.text,
            *logs,
        ]
    )
    for secret in secrets:
        assert secret not in seen


def test_basic_auth_wrong_password_is_a_retried_401_and_the_right_one_lands(
    tmp_path: Path, seg_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc", modalities={}, users={"node": PASSWORD}).start()
    try:
        config = _config(
            tmp_path,
            {
                "name": "web",
                "kind": "dicomweb",
                "url": orthanc.dicomweb_url,
                "verify": True,
                "auth.kind": "basic",
                "auth.username": "node",
                "auth.password_env": "PACS_PASSWORD",
            },
        )
        settings = load_settings(config)
        (destination,) = settings.destinations
        clock = Clock()
        jobs = _queue(settings, clock)
        job_id = _job_with_delivery(jobs, clock, destination, seg_file)

        def dispatcher(password: str) -> Dispatcher:
            session = web_session(destination, settings.tls, {"PACS_PASSWORD": password})
            return Dispatcher(
                jobs.deliveries,
                owner="test",
                calling_ae="SCPNODE",
                timeout_s=10.0,
                verify_destinations=["web"],
                web_sessions={"web": session},
            )

        wrong = dispatcher(WRONG_PASSWORD)
        with caplog.at_level(logging.DEBUG):
            assert wrong.run_once()
        (delivery,) = jobs.views.get(job_id).deliveries
        assert (delivery.state, delivery.attempts) == ("pending", 1)
        assert _sop_uids(orthanc) == []
        assert not wrong.run_once()  # retried after its backoff, not at once
        basic = base64.b64encode(f"node:{WRONG_PASSWORD}".encode()).decode()
        _assert_hidden(
            [WRONG_PASSWORD, basic, PASSWORD],
            jobs=jobs,
            job_id=job_id,
            config=config,
            caplog=caplog,
            expected_error="answered HTTP 401 Unauthorized (credentials missing or refused)",
        )

        # The secret is fixed and the dispatcher restarted: the retry stores and verifies
        # (QIDO-RS with the same credentials).
        clock.now += timedelta(seconds=6)
        assert dispatcher(PASSWORD).run_once()
        view = jobs.views.get(job_id)
        assert (view.state, view.deliveries[0].attempts) == ("done", 2)
        seg_uid = str(dcmread(seg_file, stop_before_pixels=True).SOPInstanceUID)
        assert _sop_uids(orthanc) == [seg_uid]
        jobs.engine.dispose()
    finally:
        orthanc.stop()


def test_oauth2_token_is_cached_renewed_before_expiry_and_once_after_a_401(
    tmp_path: Path,
    seg_file: Path,
    orthanc: OrthancServer,
    gateway: TokenGateway,
    ticker: Ticker,
) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    destination = Destination.model_validate(
        {
            "name": "web",
            "kind": "dicomweb",
            "url": f"{gateway.url}/dicom-web",
            "auth": {
                "kind": "oauth2",
                "token_url": f"{gateway.url}/token",
                "client_id": "scp-node",
                "client_secret_file": str(secret_file),
                "scope": "stow",
            },
        }
    )
    session = web_session(destination, TlsSection(), {}, clock=ticker)
    url = destination.url
    assert url is not None

    def stow() -> None:
        (result,) = stow_files([seg_file], url, timeout_s=10.0, session=session)
        assert result.ok

    stow()
    stow()
    assert len(gateway.issued) == 1  # fetched once, then cached
    assert (gateway.client_auths, gateway.scopes) == (["basic"], ["stow"])

    # 280 s on, the 300 s token is within its renewal margin: a new one is fetched first.
    ticker.now += 280
    stow()
    assert (len(gateway.issued), gateway.refused) == (2, 0)

    # The service revokes its tokens early (a key rotation): the 401 gets a new token and
    # one more try.
    gateway.revoke_all()
    stow()
    assert (len(gateway.issued), gateway.refused) == (3, 1)

    # Refused even with a fresh token: the 401 is the result, after exactly one renewal.
    gateway.reject_all = True
    with pytest.raises(DeliveryError, match=r"HTTP 401 Unauthorized \(credentials"):
        stow()
    assert (len(gateway.issued), gateway.refused) == (4, 3)
    seg_uid = str(dcmread(seg_file, stop_before_pixels=True).SOPInstanceUID)
    assert _sop_uids(orthanc) == [seg_uid]


def test_oauth2_client_refused_by_the_token_endpoint_fails_the_delivery_without_the_secret(
    tmp_path: Path,
    seg_file: Path,
    orthanc: OrthancServer,
    gateway: TokenGateway,
    ticker: Ticker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config(
        tmp_path,
        {
            "name": "web",
            "kind": "dicomweb",
            "url": f"{gateway.url}/dicom-web",
            "auth.kind": "oauth2",
            "auth.token_url": f"{gateway.url}/token",
            "auth.client_id": "scp-node",
            "auth.client_secret_env": "SCP_NODE_TEST_CLIENT_SECRET",
            "auth.client_auth": "body",
        },
    )
    settings = load_settings(config)
    (destination,) = settings.destinations
    clock = Clock()
    jobs = _queue(settings, clock)
    job_id = _job_with_delivery(jobs, clock, destination, seg_file)

    def dispatcher(secret: str) -> Dispatcher:
        environ = {"SCP_NODE_TEST_CLIENT_SECRET": secret}
        session = web_session(destination, settings.tls, environ, clock=ticker)
        return Dispatcher(
            jobs.deliveries,
            owner="test",
            calling_ae="SCPNODE",
            timeout_s=10.0,
            web_sessions={"web": session},
        )

    with caplog.at_level(logging.DEBUG):
        assert dispatcher(WRONG_CLIENT_SECRET).run_once()
    assert gateway.client_auths == ["body"] and not gateway.issued
    assert gateway.forwarded == 0 and _sop_uids(orthanc) == []
    _assert_hidden(
        [WRONG_CLIENT_SECRET, CLIENT_SECRET],
        jobs=jobs,
        job_id=job_id,
        config=config,
        caplog=caplog,
        expected_error=(
            f"OAuth2 token endpoint {gateway.url}/token answered HTTP 401 Unauthorized "
            "(invalid_client)"
        ),
    )

    clock.now += timedelta(seconds=6)
    assert dispatcher(CLIENT_SECRET).run_once()
    assert jobs.views.get(job_id).state == "done"
    assert len(gateway.issued) == 1 and gateway.forwarded == 1
    assert len(_sop_uids(orthanc)) == 1
    jobs.engine.dispose()


def test_static_bearer_token_is_sent_and_a_refused_one_is_not_renewed(
    seg_file: Path, orthanc: OrthancServer, gateway: TokenGateway
) -> None:
    def destination(env: str) -> Destination:
        return Destination.model_validate(
            {
                "name": "web",
                "kind": "dicomweb",
                "url": f"{gateway.url}/dicom-web",
                "auth": {"kind": "bearer", "token_env": env},
            }
        )

    environ = {"GOOD": STATIC_TOKEN, "BAD": "expired-token"}
    good = web_session(destination("GOOD"), TlsSection(), environ)
    (result,) = stow_files([seg_file], f"{gateway.url}/dicom-web", timeout_s=10.0, session=good)
    assert result.ok and gateway.forwarded == 1

    bad = web_session(destination("BAD"), TlsSection(), environ)
    with pytest.raises(DeliveryError, match="HTTP 401") as caught:
        stow_files([seg_file], f"{gateway.url}/dicom-web", timeout_s=10.0, session=bad)
    assert "expired-token" not in str(caught.value)
    assert gateway.refused == 1 and not gateway.issued  # one try: nothing to renew


def test_https_destination_is_verified_against_tls_ca_file(
    tmp_path: Path,
    seg_file: Path,
    orthanc: OrthancServer,
    ticker: Ticker,
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Many images set this; requests would let it replace a session's CA bundle.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    gateway = TokenGateway(
        orthanc.url, "scp-node", CLIENT_SECRET, ticker, tls=(pki.server_cert, pki.server_key)
    ).start()
    try:
        destination = Destination.model_validate(
            {
                "name": "web",
                "kind": "dicomweb",
                "url": f"{gateway.url}/dicom-web",
                "auth": {
                    "kind": "oauth2",
                    "token_url": f"{gateway.url}/token",
                    "client_id": "scp-node",
                    "client_secret_env": "SECRET",
                },
            }
        )
        assert destination.url is not None and destination.url.startswith("https://")
        environ = {"SECRET": CLIENT_SECRET}

        # The test CA is not among the default CAs: the token endpoint's certificate fails.
        untrusted = web_session(destination, TlsSection(), environ, clock=ticker)
        with pytest.raises(DeliveryError, match="certificate verify failed"):
            stow_files([seg_file], destination.url, timeout_s=10.0, session=untrusted)
        assert not gateway.issued

        trusted = web_session(destination, TlsSection(ca_file=pki.ca_cert), environ, clock=ticker)
        (result,) = stow_files([seg_file], destination.url, timeout_s=10.0, session=trusted)
        assert result.ok and len(gateway.issued) == 1 and gateway.forwarded == 1

        # The STOW-RS request itself is verified too (a static token, no token endpoint).
        bearer = Destination.model_validate(
            {
                "name": "web",
                "kind": "dicomweb",
                "url": f"{gateway.url}/dicom-web",
                "auth": {"kind": "bearer", "token_env": "TOKEN"},
            }
        )
        plain = web_session(bearer, TlsSection(), {"TOKEN": "x"})
        with pytest.raises(DeliveryError, match="certificate verify failed"):
            stow_files([seg_file], destination.url, timeout_s=10.0, session=plain)
        assert gateway.forwarded + gateway.refused == 1  # nothing got through the handshake
    finally:
        gateway.stop()
