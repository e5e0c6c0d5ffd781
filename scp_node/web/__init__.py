"""The web dashboard: jobs, one job with its live log and SEG preview, node health,
``/metrics`` (Prometheus) and ``/healthz``."""

from __future__ import annotations

from scp_node.web.health import HealthReport, NodeRuntime, check_health
from scp_node.web.server import WebContext, WebServer, is_loopback

__all__ = ["HealthReport", "NodeRuntime", "WebContext", "WebServer", "check_health", "is_loopback"]
