"""The dashboard app (Starlette's TestClient) against a real job table (SQLite), and the
uvicorn server it runs in over real HTTP on loopback."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.testclient import TestClient

from scp_node.app import Database, build_queue
from scp_node.errors import BindError
from scp_node.inference.registry import CodeSpec, LabelSpec
from scp_node.metrics import NodeMetrics
from scp_node.output.preview import preview_path_for, render_preview, write_preview
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import Outcome, Stage
from scp_node.queue.records import DeliveryTarget, InstanceRecord
from scp_node.queue.retry import RetryPolicy
from scp_node.settings import WebSection
from scp_node.web import NodeRuntime, WebServer, create_app
from scp_node.web.health import ReceiverStatus
from tests.support.seeded import PAIR_NEW_SEG, PAIR_OLD_SEG, seed_superseding_pair

TOKEN = "s3cret-admin-token-0123"


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Site:
    client: TestClient
    jobs: Database
    ids: dict[str, int]
    runtime: NodeRuntime
    metrics: NodeMetrics

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        data = urlencode(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        resp = self.client.request(method, path, content=data, headers=all_headers)
        return Response(resp.status_code, resp.headers, resp.content)


def _record(jobs: Database, root: Path, study: str, n: int, description: str) -> None:
    for i in range(n):
        jobs.intake.record_instance(
            InstanceRecord(
                study_instance_uid=study,
                series_instance_uid=f"{study}.1",
                sop_instance_uid=f"{study}.1.{i + 1}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                modality="CT",
                path=str(root / f"{study}-{i}.dcm"),
                size_bytes=100,
                calling_ae="TEST",
                series_description=description,
                study_date="20250102",
            )
        )


def _populate(jobs: Database, root: Path) -> dict[str, int]:
    """A done job with SEG and preview, a delivering job with a failed attempt, a queued job."""
    _record(jobs, root, "1.2.826.0.1.1", 12, "ABD CT")
    _record(jobs, root, "1.2.826.0.1.2", 8, "CHEST")
    done_id, delivering_id = sorted(jobs.settling.settle(0.0, ["ct-abdomen"]))

    seg_path = root / "outbox" / str(done_id) / "1.2.826.0.1.1.99.dcm"
    seg_path.parent.mkdir(parents=True)
    seg_path.write_bytes(b"not read by the dashboard")
    volume = np.zeros((3, 32, 32), dtype=np.float32)
    labels = np.zeros((3, 32, 32), dtype=np.uint8)
    labels[1, 8:24, 8:24] = 1
    code = CodeSpec(code="10200004", scheme="SCT", meaning="Liver")
    liver = LabelSpec(value=1, name="liver", category=code, type=code, color=(255, 0, 0))
    write_preview(render_preview(volume, labels, [liver]), preview_path_for(seg_path))

    for job_id in (done_id, delivering_id):
        claimed = jobs.work.claim("test-worker", 60.0)
        assert claimed is not None and claimed.id == job_id
        for stage, seconds in (
            (Stage.SELECT, 0.01),
            (Stage.LOAD, 0.2),
            (Stage.INFERENCE, 1.5),
            (Stage.SEG, 0.3),
        ):
            jobs.work.record_stage(claimed.id, claimed.token, stage, seconds)
        jobs.work.complete(
            claimed.id,
            claimed.token,
            series_instance_uid=f"{claimed.study_instance_uid}.1",
            seg_path=str(seg_path),
            seg_sop_instance_uid="1.2.826.0.1.1.99",
            outcome=Outcome.SEG,
            destinations=(
                ()
                if job_id == done_id
                else (DeliveryTarget(name="pacs", ae_title="PACS", host="127.0.0.1", port=1),)
            ),
        )
    delivery = jobs.deliveries.claim("test-dispatch", 60.0)
    assert delivery is not None and delivery.job_id == delivering_id
    jobs.deliveries.failed(delivery.id, delivery.token, "association rejected")

    _record(jobs, root, "1.2.826.0.1.3", 3, "HEAD")
    (queued_id,) = jobs.settling.settle(0.0, ["ct-abdomen"])
    return {"done": done_id, "delivering": delivering_id, "queued": queued_id}


@dataclass
class Table:
    engine: Engine
    jobs: Database
    ids: dict[str, int]

    def app(self, runtime: NodeRuntime, metrics: NodeMetrics, **web: Any) -> Starlette:
        settings = WebSection(**{"host": "127.0.0.1", "port": 0, **web})
        views, admin = self.jobs.views, self.jobs.admin
        return create_app(views, admin, settings, runtime, metrics, stop=threading.Event())


@pytest.fixture
def table(tmp_path: Path) -> Iterator[Table]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    jobs = build_queue(engine, RetryPolicy(3, 1.0, 10.0, 2.0, 3600.0))
    yield Table(engine, jobs, _populate(jobs, tmp_path))
    engine.dispose()


@pytest.fixture
def site_factory(tmp_path: Path, table: Table) -> Iterator[Callable[..., Site]]:
    clients: list[TestClient] = []

    def make(**web: Any) -> Site:
        runtime = NodeRuntime(spool_dir=tmp_path, min_free_bytes=0)
        metrics = NodeMetrics()
        client = TestClient(table.app(runtime, metrics, **web), follow_redirects=False)
        clients.append(client)
        return Site(client, table.jobs, table.ids, runtime, metrics)

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def site(site_factory: Callable[..., Site]) -> Site:
    return site_factory()


def test_jobs_page_lists_jobs_with_series_columns_and_filters(site: Site) -> None:
    page = site.request("GET", "/jobs")
    assert page.status == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert 'http-equiv="refresh"' in page.text
    for state, job_id in site.ids.items():
        assert f'data-job-id="{job_id}" data-state="{state}"' in page.text
    assert "ABD CT" in page.text and "CHEST" in page.text and "20250102" in page.text
    assert "inference 1.50s" in page.text
    assert "//" not in page.text.replace("http://", "").replace("https://", ""), "no external URL"

    only_done = site.request("GET", "/jobs?state=done")
    assert f'data-job-id="{site.ids["done"]}"' in only_done.text
    assert f'data-job-id="{site.ids["queued"]}"' not in only_done.text
    assert site.request("GET", "/jobs?state=bogus").status == 400
    assert site.request("GET", "/jobs?page=0").status == 400
    assert 'data-job-id="' not in site.request("GET", "/jobs?page=2").text
    assert site.request("GET", "/").headers["Location"] == "/jobs"
    assert site.request("GET", "/nowhere").status == 404


def test_job_page_shows_timeline_deliveries_and_preview(site: Site) -> None:
    done = site.request("GET", f"/jobs/{site.ids['done']}")
    assert done.status == 200
    for step in ("received", "settled", "claimed", "inferred"):
        assert f'class="step reached" data-step="{step}"' in done.text
    assert 'id="preview"' in done.text
    png = site.request("GET", f"/jobs/{site.ids['done']}/preview.png")
    assert png.status == 200 and png.headers["Content-Type"] == "image/png"
    assert png.body.startswith(b"\x89PNG\r\n\x1a\n")

    delivering = site.request("GET", f"/jobs/{site.ids['delivering']}")
    assert 'data-destination="pacs" data-state="pending"' in delivering.text
    assert "association rejected" in delivering.text
    assert 'class="step pending" data-step="delivered"' in delivering.text

    queued = site.request("GET", f"/jobs/{site.ids['queued']}")
    assert 'id="preview"' not in queued.text
    assert site.request("GET", f"/jobs/{site.ids['queued']}/preview.png").status == 404
    assert site.request("GET", "/jobs/999").status == 404
    assert site.request("GET", "/static/app.js").status == 200
    assert site.request("GET", "/static/nothere.js").status == 404


def test_api_returns_the_same_data_as_json(site: Site) -> None:
    listed = site.request("GET", "/api/jobs").json()
    assert {j["id"] for j in listed} == set(site.ids.values())
    one = site.request("GET", f"/api/jobs/{site.ids['done']}").json()
    assert one["state"] == "done" and one["slices"] == 12 and one["modality"] == "CT"
    assert [e["stage"] for e in one["events"]][:2] == ["settled", "claim"]
    assert site.request("GET", "/api/jobs/999").status == 404


def _read_sse(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while len(events) < count:
        line = next(lines, None)
        assert line is not None, "stream ended early"
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


def test_live_log_streams_existing_then_new_events(site: Site) -> None:
    job_id = site.ids["queued"]
    with site.client.stream("GET", f"/jobs/{job_id}/events") as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        lines = resp.iter_lines()
        (first,) = _read_sse(lines, 1)
        assert first["stage"] == "settled" and first["job_id"] == job_id
        site.jobs.admin.cancel(job_id)
        (cancelled,) = _read_sse(lines, 1)
        assert cancelled["state"] == "cancelled" and cancelled["level"] == "warning"
        assert cancelled["id"] > first["id"]

    # A reconnecting EventSource resumes after Last-Event-ID.
    with site.client.stream(
        "GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(first["id"])}
    ) as resp:
        (resumed,) = _read_sse(resp.iter_lines(), 1)
        assert resumed["id"] == cancelled["id"]


def test_loopback_retry_and_cancel_without_token(site: Site) -> None:
    queued = site.ids["queued"]
    resp = site.request("POST", f"/jobs/{queued}/cancel", {})
    assert resp.status == 303 and resp.headers["Location"] == f"/jobs/{queued}"
    assert site.jobs.views.get(queued).state == "cancelled"
    again = site.request("POST", f"/jobs/{queued}/cancel", {}, {"Accept": "application/json"})
    assert again.status == 409 and "already cancelled" in again.json()["error"]
    retried = site.request("POST", f"/jobs/{queued}/retry", {}, {"Accept": "application/json"})
    assert retried.status == 200 and retried.json() == {"id": queued, "state": "queued"}
    assert site.request("POST", "/jobs/999/retry", {}).status == 404
    foreign = site.request("POST", f"/jobs/{queued}/cancel", {}, {"Origin": "http://evil.test"})
    assert foreign.status == 403
    assert site.jobs.views.get(queued).state == "queued"


def test_non_loopback_bind_without_token_refuses_mutations(
    site_factory: Callable[..., Site],
) -> None:
    site = site_factory(host="0.0.0.0")
    queued = site.ids["queued"]
    resp = site.request("POST", f"/jobs/{queued}/cancel", {}, {"Accept": "application/json"})
    assert resp.status == 403
    assert "web.token is not set" in resp.json()["error"]
    assert site.jobs.views.get(queued).state == "queued"
    assert site.request("GET", "/jobs").status == 200  # reading stays open


def test_token_is_checked_on_every_mutating_request(site_factory: Callable[..., Site]) -> None:
    site = site_factory(host="0.0.0.0", token=TOKEN)
    queued = site.ids["queued"]
    json_accept = {"Accept": "application/json"}
    assert site.request("POST", f"/jobs/{queued}/cancel", {}, json_accept).status == 401
    wrong = {"token": "x" * 20}
    assert site.request("POST", f"/jobs/{queued}/cancel", wrong, json_accept).status == 401
    assert site.jobs.views.get(queued).state == "queued"
    bearer = {**json_accept, "Authorization": f"Bearer {TOKEN}"}
    assert site.request("POST", f"/jobs/{queued}/cancel", {}, bearer).status == 200
    assert site.request("POST", f"/jobs/{queued}/retry", {"token": TOKEN}).status == 303
    assert site.jobs.views.get(queued).state == "queued"
    assert 'name="token"' in site.request("GET", f"/jobs/{queued}").text


def test_metrics_match_the_job_table(site: Site) -> None:
    site.metrics.record_received(1234)
    site.metrics.record_refused(0xC210)
    resp = site.request("GET", "/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }
    assert samples[("scp_node_jobs", (("state", "done"),))] == 1
    assert samples[("scp_node_jobs", (("state", "delivering"),))] == 1
    assert samples[("scp_node_queue_depth", ())] == 1
    assert samples[("scp_node_worker_busy", ())] == 0
    assert samples[("scp_node_instances_received_total", ())] == 1
    assert samples[("scp_node_received_bytes_total", ())] == 1234
    assert samples[("scp_node_instances_refused_total", (("status", "0xC210"),))] == 1
    assert samples[("scp_node_stage_seconds_count", (("stage", "inference"),))] == 2
    assert samples[("scp_node_stage_seconds_sum", (("stage", "inference"),))] == pytest.approx(3.0)
    assert samples[("scp_node_stage_seconds_count", (("stage", "settle_wait"),))] == 3
    # A second scrape does not count the same events twice.
    again = site.request("GET", "/metrics").text
    assert 'scp_node_stage_seconds_count{stage="inference"} 2.0' in again


def test_healthz_reports_database_disk_and_threads(site: Site) -> None:
    ok = site.request("GET", "/healthz")
    assert ok.status == 200
    body = ok.json()
    assert body["status"] == "ok" and body["checks"]["database"]["ok"] is True
    assert body["jobs"]["queued"] == 1
    page = site.request("GET", "/health")
    assert 'data-check="database" data-ok="true"' in page.text

    site.runtime.min_free_bytes = 1 << 62
    dead = threading.Thread(target=lambda: None, name="worker")
    dead.start()
    dead.join()
    site.runtime.threads = {"worker": dead}
    failing = site.request("GET", "/healthz")
    assert failing.status == 503
    checks = failing.json()["checks"]
    assert checks["disk"]["ok"] is False and checks["worker"]["ok"] is False
    assert 'id="overall" class="badge failed"' in site.request("GET", "/health").text


def test_healthz_fails_until_start_up_is_done(site: Site) -> None:
    site.runtime.starting = True
    starting = site.request("GET", "/healthz")
    assert starting.status == 503
    assert starting.json()["checks"]["start-up"] == {"ok": False, "detail": "starting"}
    site.runtime.starting = False
    done = site.request("GET", "/healthz")
    assert done.status == 200
    assert done.json()["checks"]["start-up"] == {"ok": True, "detail": "done"}


def test_healthz_and_health_page_say_which_model_is_down(site: Site) -> None:
    site.runtime.models = lambda: {
        "ct-abdomen": "loaded",
        "broken": "down: models/broken/model.toml: labels.0.type: Field required",
    }
    answer = site.request("GET", "/healthz")
    assert answer.status == 503
    body = answer.json()
    assert body["checks"]["model ct-abdomen"] == {"ok": True, "detail": "loaded"}
    assert body["checks"]["model broken"] == {
        "ok": False,
        "detail": "down: models/broken/model.toml: labels.0.type: Field required",
    }
    assert body["models"]["broken"].startswith("down: ")
    page = site.request("GET", "/health").text
    assert 'data-check="model broken" data-ok="false"' in page
    assert "labels.0.type: Field required" in page


def test_healthz_and_health_page_show_each_receiver(site: Site) -> None:
    site.runtime.receivers = lambda: [
        ReceiverStatus(0, 4101, True, 0, connections=3, instances=120, refused=1),
        ReceiverStatus(1, None, False, 2, connections=2, instances=80, refused=0),
    ]
    answer = site.request("GET", "/healthz")
    assert answer.status == 503
    body = answer.json()
    assert body["checks"]["receiver 0"]["ok"] is True
    assert body["checks"]["receiver 1"] == {"ok": False, "detail": "pid None, down, 2 restarts"}
    assert body["receivers"][0] == {
        "index": 0,
        "pid": 4101,
        "alive": True,
        "restarts": 0,
        "connections": 3,
        "instances": 120,
        "refused": 1,
    }
    page = site.request("GET", "/health").text
    assert 'data-receiver="0" data-alive="true"' in page
    assert 'data-receiver="1" data-alive="false"' in page


def test_missing_job_is_404_and_wrong_state_is_409_without_a_read_first(site: Site) -> None:
    missing = site.request("GET", "/api/jobs/999")
    assert missing.status == 404 and missing.json() == {"error": "job 999 does not exist"}
    page = site.request("GET", "/jobs/999")
    assert page.status == 404 and page.headers["Content-Type"].startswith("text/html")
    assert "job 999 does not exist" in page.text
    json_accept = {"Accept": "application/json"}
    assert site.request("POST", "/jobs/999/cancel", {}, json_accept).json() == {
        "error": "job 999 does not exist"
    }
    done = site.ids["done"]
    busy = site.request("POST", f"/jobs/{done}/cancel", {}, json_accept)
    assert busy.status == 409 and "already done" in busy.json()["error"]
    html = site.request("POST", f"/jobs/{site.ids['queued']}/retry", {})
    assert html.status == 409 and "only done, failed or cancelled" in html.text
    assert site.request("GET", "/jobs/999/preview.png").status == 404
    assert site.request("GET", "/jobs/not-a-number").status == 404
    wrong_method = site.request("POST", "/jobs", {})
    assert wrong_method.status == 405 and "GET" in wrong_method.headers["Allow"]


def test_every_response_carries_the_security_headers(site: Site) -> None:
    for path in ("/jobs", "/api/jobs", "/static/style.css", "/nowhere", "/healthz"):
        headers = site.request("GET", path).headers
        assert headers["Content-Security-Policy"].startswith("default-src 'self'"), path
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["Cache-Control"] == "no-store", path


def _get(conn: http.client.HTTPConnection, path: str) -> http.client.HTTPResponse:
    conn.request("GET", path)
    return conn.getresponse()


def test_uvicorn_serves_the_app_over_http_and_stops_with_a_stream_open(
    tmp_path: Path, table: Table
) -> None:
    stop = threading.Event()
    app = create_app(
        table.jobs.views,
        table.jobs.admin,
        WebSection(host="127.0.0.1", port=0),
        NodeRuntime(spool_dir=tmp_path, min_free_bytes=0),
        NodeMetrics(),
        stop=stop,
    )
    server = WebServer(app, "127.0.0.1", 0, stop).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    live = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        health = _get(conn, "/healthz")
        assert health.status == 200 and json.loads(health.read())["status"] == "ok"
        assert health.getheader("Server", "").startswith("scp-node/")
        stream = _get(live, f"/jobs/{table.ids['queued']}/events")
        assert stream.getheader("Content-Type") == "text/event-stream"
        line = stream.readline()
        while not line.startswith(b"data: "):
            line = stream.readline()
        assert json.loads(line[6:])["stage"] == "settled"
    finally:
        server.stop()
        conn.close()
        live.close()
    assert stop.is_set()
    assert not any(t.name == "web" and t.is_alive() for t in threading.enumerate())


def test_port_in_use_stops_start_up_with_one_line(
    tmp_path: Path, table: Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = table.app(NodeRuntime(spool_dir=tmp_path), NodeMetrics())
        with pytest.raises(BindError, match=f"127.0.0.1:{port}: port already in use"):
            WebServer(app, "127.0.0.1", port, threading.Event())

        env = {
            **os.environ,
            "SCP_NODE_DATABASE__URL": str(table.engine.url),
            "SCP_NODE_LOG__DIR": str(tmp_path / "log"),
        }
        result = subprocess.run(
            [sys.executable, "-m", "scp_node.cli", "web", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: dashboard cannot listen on") and "already in use" in line


def test_job_page_shows_which_seg_superseded_which(site: Site) -> None:
    site.jobs.admin.cancel(site.ids["queued"])  # the seeder claims the next queued job
    first, second = seed_superseding_pair(site.jobs, "1.2.826.0.1.9")
    new = site.request("GET", f"/jobs/{second}")
    assert new.status == 200
    assert f'<dd id="supersedes" class="uid">{PAIR_OLD_SEG} (instance 1, job {first})</dd>' in (
        new.text
    )
    assert 'id="superseded-by"' not in new.text
    assert f"{PAIR_NEW_SEG} (instance 2)" in new.text
    old = site.request("GET", f"/jobs/{first}")
    assert (
        f'<dd id="superseded-by" class="uid">{PAIR_NEW_SEG} (instance 2, job {second})</dd>'
        in old.text
    )
    api = site.request("GET", f"/api/jobs/{second}").json()
    assert api["supersedes"]["job_id"] == first
