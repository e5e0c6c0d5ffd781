"""The whole node as a subprocess (`scp-node serve`), driven by real peers on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.support.cluster import NodeProc
from tests.support.net import PacsStub, free_port

SCP_NODE = Path(sys.executable).parent / "scp-node"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class NodeProcess(NodeProc):
    """A running `scp-node serve`, the PACS port it sends to, and CLI helpers on its config."""

    def __init__(self, root: Path, config: Path, port: int, pacs_port: int) -> None:
        super().__init__("serve", config, root, "stdout", port)
        self.pacs_port = pacs_port
        self.log = root / "stdout.log"

    def start(self, wait: bool = True) -> NodeProcess:
        super().start(wait)
        return self

    def cli(self, *args: str) -> str:
        """Run the CLI against this node's config (after the group name for `jobs ...`)."""
        head, rest = (args[:1], args[1:]) if args[0] == "jobs" else (args, ())
        result = subprocess.run(
            [str(SCP_NODE), *head, "--config", str(self.config), *rest],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    def jobs(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("jobs", "--json")))

    def spool_files(self) -> list[Path]:
        return sorted((self.root / "spool").rglob("*.dcm"))

    def storescu(self, files: list[Path], calling: str = "STORESCU") -> None:
        result = subprocess.run(
            ["storescu", "-aet", calling, "-aec", "SCPNODE", "-xv", "127.0.0.1", str(self.port)]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            env=DCMTK_ENV,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr


def write_config(
    root: Path,
    port: int,
    pacs_port: int,
    *,
    destinations: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> Path:
    """A config.toml for a test node: temp paths, short timings, the PACS stub as destination.

    ``destinations`` (each a ``[[destinations]]`` table) replaces the default PACS stub entry.
    """
    values: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "SCPNODE", "host": "127.0.0.1", "port": port},
        "storage": {"spool_dir": str(root / "spool"), "min_free_bytes": 0},
        "database": {"url": f"sqlite:///{root / 'node.db'}"},
        "settle": {"quiet_s": 1.0, "poll_s": 0.2},
        "worker": {
            "device": "cpu",
            "model": "ct-abdomen",
            "models_dir": str(REPO_ROOT / "models"),
            "outbox_dir": str(root / "outbox"),
            "lease_s": 30,
            "heartbeat_s": 2,
            "poll_s": 0.2,
            "threads": 1,
        },
        "retry": {"max_attempts": 3, "initial_backoff_s": 0.5, "max_backoff_s": 1.0},
        "log": {"level": "INFO", "dir": str(root / "log")},
        # Each test node gets its own dashboard port so parallel nodes never collide.
        "web": {"host": "127.0.0.1", "port": free_port()},
    }
    for name, overrides in sections.items():
        values.setdefault(name, {}).update(overrides)
    lines: list[str] = []
    for section, items in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in items.items())
        lines.append("")
    if destinations is None:
        destinations = [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
        ]
    for destination in destinations:
        lines.append("[[destinations]]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in destination.items())
        lines.append("")
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    """Make (not start) nodes; every started one is stopped at teardown."""
    made: list[NodeProcess] = []

    def make(**sections: dict[str, Any]) -> NodeProcess:
        root = tmp_path / f"node{len(made)}"
        root.mkdir()
        port, pacs_port = free_port(), free_port()
        node = NodeProcess(root, write_config(root, port, pacs_port, **sections), port, pacs_port)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def pacs_factory(tmp_path: Path) -> Iterator[Any]:
    """PACS stand-ins listening on the port a node sends to."""
    started: list[PacsStub] = []

    def make(port: int, status: int = 0) -> PacsStub:
        stub = PacsStub(tmp_path / f"pacs{len(started)}", port, status=status).start()
        started.append(stub)
        return stub

    yield make
    for stub in started:
        stub.stop()
