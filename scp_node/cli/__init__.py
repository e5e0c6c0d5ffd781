"""The ``scp-node`` command line (typer + rich): one module per command group.

- :mod:`~scp_node.cli.run`: ``serve``, ``receive``, ``work``, ``dispatch``, ``web``;
- :mod:`~scp_node.cli.jobs`: ``jobs`` (list, show, retry, cancel) and ``logs``;
- :mod:`~scp_node.cli.dicom`: ``echo`` and ``send``;
- :mod:`~scp_node.cli.model`: ``model train|evaluate|prune|quantize|export``;
- :mod:`~scp_node.cli.db`: ``db upgrade``;
- :mod:`~scp_node.cli.rules`: ``rules test STUDY_DIR`` (which model takes which series).

Errors become one line on stderr and an exit status in :func:`scp_node.cli.common.on_error`.
"""

from __future__ import annotations

import typer

from scp_node.cli import db, dicom, jobs, model, rules, run

__all__ = ["app"]

app = typer.Typer(help="DICOM network inference node.", no_args_is_help=True)
for command in (run.serve, run.web, run.receive, run.work, run.dispatch):
    app.command()(command)
app.add_typer(jobs.app, name="jobs")
app.add_typer(db.app, name="db")
app.add_typer(model.app, name="model")
app.add_typer(rules.app, name="rules")
app.command()(jobs.logs)
app.command()(dicom.echo)
app.command()(dicom.send)
