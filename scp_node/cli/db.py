"""``scp-node db``: database maintenance."""

from __future__ import annotations

import typer

from scp_node.cli.common import ConfigOption, console, load, on_error

__all__ = ["app"]

app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


@app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the job table to the latest schema."""
    from scp_node.app import open_database

    settings = load(config)
    with on_error():
        open_database(settings)
    console.print("database at latest schema")
