"""A node's work stage run in a thread of the test process, and its ``/healthz`` read back."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from scp_node.app import Stage, run_node
from scp_node.settings import Settings
from tests.support.net import wait_until


@contextmanager
def work_stage_running(settings: Settings) -> Iterator[str]:
    """Run ``run_node(settings, {Stage.WORK})`` in a daemon thread; yields the base URL of
    its web page. On leaving, the node is told to stop and joined (30 s); when the block
    ended without an exception, the thread must have ended too."""
    stop = threading.Event()
    node = threading.Thread(
        target=run_node,
        args=(settings, {Stage.WORK}),
        kwargs={"stop": stop, "install_signals": False},
        daemon=True,
    )
    node.start()
    try:
        yield f"http://127.0.0.1:{settings.web.port}"
    finally:
        stop.set()
        node.join(30)
    assert not node.is_alive()


def wait_for_model(base: str, timeout_s: float = 120) -> dict[str, Any]:
    """Poll ``{base}/healthz`` until the worker reports a loaded model variant; returns the
    body (connection errors while the node starts count as not yet)."""

    def model_loaded() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
                body: dict[str, Any] = json.loads(response.read().decode())
        except OSError:
            return None
        return body if body["model"]["variant"] else None

    health: dict[str, Any] = wait_until(model_loaded, timeout_s, "the worker to load its model")
    return health
