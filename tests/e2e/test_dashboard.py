"""The dashboard after a real end-to-end run: headless Chromium renders the job page (screenshot
kept in ``test-artifacts/``), the DOM shows the job done with its timeline and a loaded
preview; ``/metrics`` counts what storescu sent; the preview PNG has the SEG's outlines."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from scp_node.output.preview import TILE_PX, preview_path_for, preview_size
from tests.conftest import REPO_ROOT
from tests.support.net import wait_for_port, wait_until
from tests.support.ohif import HEADLESS_FLAGS

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_FLAGS = [*HEADLESS_FLAGS, "--hide-scrollbars"]


def _chromium(profile: Path, *args: str) -> str:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: run `make peers`"
    profile.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_dashboard_after_end_to_end_run(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path], tmp_path: Path
) -> None:
    node = node_factory()
    pacs = pacs_factory(node.pacs_port)
    web_port = tomllib.loads(node.config.read_text())["web"]["port"]
    node.start()
    wait_for_port(web_port, timeout_s=60)
    node.storescu(ct_b_files)
    (job,) = wait_until(
        lambda: [j for j in node.jobs() if j["state"] == "done" and j["outcome"] == "seg"],
        240,
        "the job to be done with a SEG",
    )
    assert len(pacs.files()) == 1
    base = f"http://127.0.0.1:{web_port}"

    # /metrics: what storescu sent and what the node did.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(_get(f"{base}/metrics"))
        for s in family.samples
    }
    assert samples[("scp_node_instances_received_total", ())] == len(ct_b_files)
    # Bytes as received: the spool keeps each data set exactly as it came off the wire.
    spooled = node.spool_files()
    assert len(spooled) == len(ct_b_files)
    assert samples[("scp_node_received_bytes_total", ())] == sum(p.stat().st_size for p in spooled)
    assert not [k for k in samples if k[0] == "scp_node_instances_refused_total"]
    assert samples[("scp_node_delivery_attempts_total", (("destination", "pacs"),))] == 1
    assert samples[("scp_node_jobs", (("state", "done"),))] == 1
    assert samples[("scp_node_stage_seconds_count", (("stage", "inference"),))] == 1
    assert samples[("scp_node_stage_seconds_count", (("stage", "delivery"),))] == 1
    assert '"status": "ok"' in _get(f"{base}/healthz")

    # The preview PNG beside the SEG: right size, outlines where the SEG has segments.
    seg_path = Path(job["seg_path"])
    png_path = preview_path_for(seg_path if seg_path.is_absolute() else node.root / seg_path)
    seg = hd.seg.segread(pacs.files()[0])
    labelled = {
        int(frame.FrameContentSequence[0].DimensionIndexValues[-1])
        for frame, pixels in zip(
            seg.PerFrameFunctionalGroupsSequence,
            seg.pixel_array.reshape(seg.NumberOfFrames, -1),
            strict=True,
        )
        if pixels.any()
    }
    assert labelled
    card = tomllib.loads((REPO_ROOT / "models" / "ct-abdomen" / "model.toml").read_text())
    colors = {tuple(label["color"]) for label in card["labels"] if "color" in label}
    with Image.open(png_path) as png:
        n_tiles = png.width // TILE_PX
        assert png.size == preview_size(n_tiles) and 1 <= n_tiles <= 4
        rgb = np.asarray(png.convert("RGB"))
    tiles = rgb[:TILE_PX]
    outline = np.zeros(tiles.shape[:2], dtype=bool)
    for color in colors or {(255, 0, 0)}:
        outline |= np.all(tiles == np.array(color, dtype=np.uint8), axis=-1)
    for n in range(n_tiles):
        assert outline[:, n * TILE_PX : (n + 1) * TILE_PX].sum() > 20, f"no outline in tile {n}"

    # Headless Chromium: screenshot, then the DOM after load.
    ARTIFACTS.mkdir(exist_ok=True)
    page = f"{base}/jobs/{job['id']}"
    shot = ARTIFACTS / "dashboard-job.png"
    shot.unlink(missing_ok=True)
    _chromium(tmp_path / "chrome1", "--window-size=1280,1500", f"--screenshot={shot}", page)
    with Image.open(shot) as image:
        assert image.size == (1280, 1500)
    _chromium(
        tmp_path / "chrome2", "--window-size=1280,900",
        f"--screenshot={ARTIFACTS / 'dashboard-jobs.png'}", f"{base}/jobs",
    )  # fmt: skip
    dom = _chromium(tmp_path / "chrome3", "--dump-dom", page)
    assert re.search(r'id="state" class="badge done" data-state="done"', dom)
    for step in ("received", "settled", "claimed", "inferred", "delivered"):
        assert f'class="step reached" data-step="{step}"' in dom, step
    loaded = re.search(r'<img id="preview"[^>]*data-loaded="([^"]+)"', dom)
    assert loaded and loaded.group(1) == str(png.width), "the preview image did not load"
    assert 'data-destination="pacs" data-state="done"' in dom
    jobs_dom = _chromium(tmp_path / "chrome4", "--dump-dom", f"{base}/jobs")
    assert f'data-job-id="{job["id"]}" data-state="done"' in jobs_dom
