"""The dashboard: a Starlette app (pages, JSON API, live log, /metrics, /healthz) served by
uvicorn in the node's process."""

from scp_node.web.app import create_app
from scp_node.web.health import HealthReport, NodeRuntime, check_health
from scp_node.web.security import is_loopback
from scp_node.web.server import WebServer

__all__ = ["HealthReport", "NodeRuntime", "WebServer", "check_health", "create_app", "is_loopback"]
