"""What every command group shares: the consoles, ``--config``, settings, logging, and the
one place where a :class:`~scp_node.errors.NodeError` becomes a message and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from scp_node.errors import ConfigError, NodeError
from scp_node.settings import Settings, load_settings

if TYPE_CHECKING:
    from scp_node.queue.admin import JobAdmin
    from scp_node.queue.views import JobViews

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigOption",
    "configure_logging",
    "console",
    "err_console",
    "exit_code",
    "fail",
    "job_table",
    "load",
    "on_error",
    "overrides",
]

console = Console()
err_console = Console(stderr=True)

DEFAULT_CONFIG = Path("config.toml")
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config.toml to load (default: ./config.toml if present)."),
]

#: Exit status by error class (the most specific listed base wins); anything else is the
#: command's default (1, or 2 where bad input is the usual cause, as for ``model``).
EXIT_CODES: dict[type[NodeError], int] = {ConfigError: 2}


def exit_code(exc: NodeError, default: int = 1) -> int:
    """The exit status for ``exc``: from :data:`EXIT_CODES` by its class, else ``default``."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return default


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: message`` on stderr; return the Exit to raise."""
    # One line whatever the terminal's width, so scripts and logs get it whole.
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def on_error(default: int = 1, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """Turn a NodeError (and the ``also`` exceptions) into one line on stderr and an exit.

    Raises
    ------
    typer.Exit
        With :func:`exit_code` of the error (``default`` for the ``also`` exceptions).
    """
    try:
        yield
    except NodeError as exc:
        raise fail(str(exc), exit_code(exc, default)) from exc
    except also as exc:
        raise fail(str(exc), default) from exc


def load(config: Path | None, values: dict[str, Any] | None = None) -> Settings:
    """Settings from ``config`` (or ./config.toml when present), environment and ``values``.

    Raises
    ------
    typer.Exit
        With status 2 when the configuration is invalid.
    """
    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    with on_error(default=2):
        return load_settings(path, values)


def overrides(**values: Any) -> dict[str, Any]:
    """CLI flags (``section__key=value``) as nested overrides, keeping only the ones given."""
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        if value is None:
            continue
        section, key = dotted.split("__")
        nested.setdefault(section, {})[key] = value
    return nested


def configure_logging(settings: Settings, file_name: str) -> None:
    """JSON-lines logging as ``[log]`` says, into ``file_name`` in the log folder."""
    from scp_node.logs import configure_logging as configure

    configure(
        settings.log.level,
        settings.log.dir,
        max_bytes=settings.log.max_bytes,
        backups=settings.log.backups,
        file_name=file_name,
    )


def job_table(config: Path | None) -> tuple[JobViews, JobAdmin]:
    """Views and admin on the configured database (migrated to the latest schema)."""
    from scp_node.app import open_database

    settings = load(config)
    with on_error():
        database = open_database(settings)
    return database.views, database.admin
