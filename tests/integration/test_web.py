"""The dashboard over real HTTP on loopback against a real job table (SQLite)."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scp_node.app import Database, build_queue
from scp_node.inference.registry import CodeSpec, LabelSpec
from scp_node.metrics import NodeMetrics
from scp_node.output.preview import preview_path_for, render_preview, write_preview
from scp_node.queue.db import make_engine, upgrade
from scp_node.queue.models import Outcome, Stage
from scp_node.queue.records import DeliveryTarget, InstanceRecord
from scp_node.queue.retry import RetryPolicy
from scp_node.settings import WebSection
from scp_node.web import NodeRuntime, WebContext, WebServer

TOKEN = "s3cret-admin-token-0123"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Site:
    server: WebServer
    jobs: Database
    ids: dict[str, int]
    runtime: NodeRuntime

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            data = urlencode(body).encode() if body is not None else None
            all_headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
            conn.request(method, path, body=data, headers=all_headers)
            resp = conn.getresponse()
            return Response(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()


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


@pytest.fixture
def site_factory(tmp_path: Path) -> Iterator[Callable[..., Site]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    upgrade(engine)
    jobs = build_queue(engine, RetryPolicy(3, 1.0, 10.0, 2.0, 3600.0))
    ids = _populate(jobs, tmp_path)
    started: list[WebServer] = []

    def make(**web: Any) -> Site:
        runtime = NodeRuntime(spool_dir=tmp_path, min_free_bytes=0)
        settings = WebSection(**{"host": "127.0.0.1", "port": 0, **web})
        server = WebServer(
            WebContext(jobs.views, jobs.admin, settings, runtime, NodeMetrics(), threading.Event())
        )
        started.append(server.start())
        return Site(server, jobs, ids, runtime)

    yield make
    for server in started:
        server.stop()
    engine.dispose()


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


def _read_sse(resp: http.client.HTTPResponse, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while len(events) < count:
        line = resp.readline().decode()
        assert line, "stream ended early"
        if line.startswith("data: "):
            events.append(json.loads(line[6:]))
    return events


def test_live_log_streams_existing_then_new_events(site: Site) -> None:
    job_id = site.ids["queued"]
    conn = http.client.HTTPConnection("127.0.0.1", site.server.port, timeout=10)
    try:
        conn.request("GET", f"/jobs/{job_id}/events")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream"
        (first,) = _read_sse(resp, 1)
        assert first["stage"] == "settled" and first["job_id"] == job_id
        site.jobs.admin.cancel(job_id)
        (cancelled,) = _read_sse(resp, 1)
        assert cancelled["state"] == "cancelled" and cancelled["level"] == "warning"
        assert cancelled["id"] > first["id"]
    finally:
        conn.close()

    conn = http.client.HTTPConnection("127.0.0.1", site.server.port, timeout=10)
    try:  # a reconnecting EventSource resumes after Last-Event-ID
        conn.request("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(first["id"])})
        (resumed,) = _read_sse(conn.getresponse(), 1)
        assert resumed["id"] == cancelled["id"]
    finally:
        conn.close()


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
    site.server.ctx.metrics.record_received(1234)
    site.server.ctx.metrics.record_refused(0xC210)
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
