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

from tests.support.cluster import NodeProc
from tests.support.config import write_config
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
