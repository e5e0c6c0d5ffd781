"""Run the node: ``serve`` (every stage), ``receive``, ``work``, ``dispatch``, ``web``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from scp_node.cli.common import ConfigOption, configure_logging, load, on_error, overrides

__all__ = ["dispatch", "receive", "serve", "web", "work"]


def _run(config: Path | None, stages: set[str], log_file: str, **flags: Any) -> None:
    from scp_node.app import Stage, run_node

    settings = load(config, overrides(**flags))
    configure_logging(settings, log_file)
    with on_error():
        run_node(settings, {Stage(s) for s in stages})


def serve(
    config: ConfigOption = None,
    ae_title: Annotated[str | None, typer.Option(help="Override node.ae_title.")] = None,
    host: Annotated[str | None, typer.Option(help="Override node.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override node.port.")] = None,
    device: Annotated[str | None, typer.Option(help="Override worker.device.")] = None,
) -> None:
    """Run every stage in one process: receive, settle, work, dispatch."""
    _run(
        config,
        {"receive", "work", "dispatch"},
        "scp-node.log",
        node__ae_title=ae_title,
        node__host=host,
        node__port=port,
        worker__device=device,
    )


def web(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Override web.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override web.port.")] = None,
) -> None:
    """Run only the web dashboard, /metrics and /healthz (against the configured database)."""
    from scp_node.app import run_web

    settings = load(config, overrides(web__host=host, web__port=port))
    configure_logging(settings, "web.log")
    with on_error():
        run_web(settings)


def receive(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="Override node.port.")] = None,
) -> None:
    """Run only the Storage SCP and the settle sweep (scale-out)."""
    _run(config, {"receive"}, "receive.log", node__port=port)


def work(
    config: ConfigOption = None,
    device: Annotated[str | None, typer.Option(help="Override worker.device.")] = None,
) -> None:
    """Run only an inference worker (scale-out)."""
    _run(config, {"work"}, f"work-{os.getpid()}.log", worker__device=device)


def dispatch(config: ConfigOption = None) -> None:
    """Run only the SEG dispatcher (scale-out)."""
    _run(config, {"dispatch"}, f"dispatch-{os.getpid()}.log")
