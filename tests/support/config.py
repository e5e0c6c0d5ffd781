"""The config.toml of a test node: temp paths, short timings, loopback ports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT
from tests.support.net import free_port


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
        if name == "worker" and "models" in overrides:
            values["worker"].pop("model")  # the list replaces the one-model default
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
