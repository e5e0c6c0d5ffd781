"""``scp-node echo`` and ``scp-node send``: a DICOM node's SCU tools."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import typer

from scp_node.cli.common import ConfigOption, console, err_console, fail, load, on_error

__all__ = ["echo", "send"]

TlsOption = Annotated[
    bool,
    typer.Option("--tls", help="Use TLS with the [tls] files of --config (CA, our cert and key)."),
]


def _client_tls(config: Path | None, tls: bool) -> ssl.SSLContext | None:
    if not tls:
        return None
    from scp_node.dicom.tls import client_context_from_settings

    settings = load(config)
    with on_error(default=2):
        return client_context_from_settings(settings.tls)


def echo(
    peer: Annotated[str, typer.Argument(help="AE@HOST:PORT")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "SCPNODE",
    tls: TlsOption = False,
    config: ConfigOption = None,
) -> None:
    """C-ECHO a DICOM node."""
    from scp_node.dicom.scu import Peer
    from scp_node.dicom.scu import echo as c_echo

    context = _client_tls(config, tls)
    with on_error(also=(ValueError,)):
        target = Peer.parse(peer)
        status = c_echo(target, calling_ae=calling_ae, ssl_context=context)
    if status != 0:
        err_console.print(f"[bold red]echo status 0x{status:04X}[/]")
        raise typer.Exit(1)
    console.print(f"[green]echo ok[/] {target}")


def _dicom_files(paths: list[Path]) -> list[Path]:
    from pydicom.misc import is_dicom

    found: list[Path] = []
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        found.extend(p for p in candidates if is_dicom(p))
    return found


def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (searched recursively).")],
    to: Annotated[str, typer.Option("--to", help="AE@HOST:PORT")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "SCPNODE",
    tls: TlsOption = False,
    config: ConfigOption = None,
) -> None:
    """C-STORE DICOM files to a node, with a progress bar and a status per failure."""
    from rich.progress import Progress

    from scp_node.dicom.scu import Peer, SendResult, send_files

    try:
        target = Peer.parse(to)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    context = _client_tls(config, tls)
    files = _dicom_files(paths)
    if not files:
        raise fail("no DICOM files found")
    with Progress(console=err_console) as progress:
        task = progress.add_task(f"sending to {target}", total=len(files))

        def _advance(_result: SendResult) -> None:
            progress.advance(task)

        with on_error():
            results = send_files(
                files, target, calling_ae=calling_ae, on_sent=_advance, ssl_context=context
            )
    failed = [r for r in results if not r.ok]
    for r in failed:
        status = f"0x{r.status:04X}" if r.status is not None else "-"
        err_console.print(f"[red]failed[/] {r.path} status {status} {r.error or ''}")
    console.print(f"sent {len(results) - len(failed)}/{len(results)} to {target}")
    if failed:
        raise typer.Exit(1)
