"""The ``scp-node`` command line (typer + rich)."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from scp_node.errors import NodeError
from scp_node.settings import Settings, load_settings

app = typer.Typer(help="DICOM network inference node.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and manage jobs.", invoke_without_command=True)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
model_app = typer.Typer(help="Train and evaluate models.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")
app.add_typer(model_app, name="model")

console = Console()
err_console = Console(stderr=True)

DEFAULT_CONFIG = Path("config.toml")
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config.toml to load (default: ./config.toml if present)."),
]

STATE_STYLES = {
    "queued": "cyan",
    "running": "yellow",
    "delivering": "magenta",
    "done": "green",
    "failed": "bold red",
    "cancelled": "dim",
}
STAGES = (
    "receive",
    "settle_wait",
    "queue_wait",
    "select",
    "load",
    "inference",
    "seg",
    "delivery",
    "total",
)


def _settings(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    path = config if config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    try:
        return load_settings(path, overrides)
    except NodeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc


def _configure_logging(settings: Settings, file_name: str) -> None:
    from scp_node.logs import configure_logging

    configure_logging(
        settings.log.level,
        settings.log.dir,
        max_bytes=settings.log.max_bytes,
        backups=settings.log.backups,
        file_name=file_name,
    )


def _overrides(**values: Any) -> dict[str, Any]:
    """CLI flags as nested overrides, keeping only the ones given."""
    nested: dict[str, Any] = {}
    for dotted, value in values.items():
        if value is None:
            continue
        section, key = dotted.split("__")
        nested.setdefault(section, {})[key] = value
    return nested


def _run(config: Path | None, stages: set[str], log_file: str, **flags: Any) -> None:
    from scp_node.app import Stage, run_node

    settings = _settings(config, _overrides(**flags))
    _configure_logging(settings, log_file)
    try:
        run_node(settings, {Stage(s) for s in stages})
    except NodeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc


@app.command()
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


@app.command()
def receive(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="Override node.port.")] = None,
) -> None:
    """Run only the Storage SCP and the settle sweep (scale-out)."""
    _run(config, {"receive"}, "receive.log", node__port=port)


@app.command()
def work(
    config: ConfigOption = None,
    device: Annotated[str | None, typer.Option(help="Override worker.device.")] = None,
) -> None:
    """Run only an inference worker (scale-out)."""
    _run(config, {"work"}, f"work-{_pid()}.log", worker__device=device)


@app.command()
def dispatch(config: ConfigOption = None) -> None:
    """Run only the SEG dispatcher (scale-out)."""
    _run(config, {"dispatch"}, f"dispatch-{_pid()}.log")


def _pid() -> int:
    import os

    return os.getpid()


def _fmt_s(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}s" if value < 100 else f"{value / 60:.1f}m"


def _jobs_store(config: Path | None) -> Any:
    from scp_node.app import open_database

    return open_database(_settings(config)).jobs


@jobs_app.callback()
def jobs(
    ctx: typer.Context,
    config: ConfigOption = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON list instead of a table.")] = False,
) -> None:
    """List jobs, newest first, with the time each stage took."""
    ctx.obj = config
    if ctx.invoked_subcommand is not None:
        return
    from scp_node.queue.models import JobState

    try:
        wanted = JobState(state) if state else None
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] unknown state {state!r}")
        raise typer.Exit(2) from exc
    views = _jobs_store(config).list_jobs(state=wanted, limit=limit)
    if as_json:
        sys.stdout.write(json.dumps([v.to_json() for v in views], indent=2) + "\n")
        return
    table = Table(title="scp-node jobs", header_style="bold", expand=True)
    # Identity columns never shrink; the wide ones fold so the table fits any terminal.
    for column in ("id", "state", "try"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    for column in ("model", "study", "date", "outcome", "time per stage", "error"):
        table.add_column(column, overflow="fold", ratio=3 if column == "time per stage" else 1)
    for v in views:
        table.add_row(
            str(v.id),
            f"[{STATE_STYLES.get(str(v.state), '')}]{v.state}[/]",
            f"{v.attempts}/{v.max_attempts}",
            v.model,
            "…" + v.study_instance_uid[-12:],
            v.study_date or "",
            v.outcome or "",
            " ".join(
                f"{stage} {_fmt_s(v.durations[stage])}" for stage in STAGES if stage in v.durations
            ),
            (v.error or "")[:160],
        )
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    job_id: int,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One job: its state, stage durations, deliveries and event history."""
    jobs_store = _jobs_store(ctx.obj)
    view = jobs_store.get_job(job_id)
    if view is None:
        err_console.print(f"[bold red]error:[/] no job {job_id}")
        raise typer.Exit(1)
    events = jobs_store.events_after(0, job_id=job_id, limit=10_000)
    if as_json:
        payload = view.to_json()
        payload["events"] = [_event_json(e) for e in events]
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    console.print(
        f"[bold]job {view.id}[/] [{STATE_STYLES.get(str(view.state), '')}]{view.state}[/]"
    )
    for key, value in view.to_json().items():
        if key not in ("deliveries", "durations"):
            console.print(f"  {key}: {value}")
    console.print(
        "  durations: " + ", ".join(f"{k} {_fmt_s(v)}" for k, v in view.durations.items())
    )
    for d in view.deliveries:
        console.print(
            f"  delivery {d.destination} ({d.ae_title}@{d.host}:{d.port}): {d.state}, "
            f"{d.attempts} attempt(s){', last error: ' + d.last_error if d.last_error else ''}"
        )
    for event in events:
        console.print(_event_line(event))


def _job_action(config: Path | None, job_id: int, action: str, done: str) -> None:
    try:
        getattr(_jobs_store(config), action)(job_id)
    except NodeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"job {job_id} {done}")


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job_id: int) -> None:
    """Run a failed or cancelled job again (or resend its SEG if only delivery failed)."""
    _job_action(ctx.obj, job_id, "retry_job", "requeued")


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: int) -> None:
    """Cancel a job that has not finished."""
    _job_action(ctx.obj, job_id, "cancel_job", "cancelled")


def _event_json(event: Any) -> dict[str, Any]:
    return {
        "id": event.id,
        "job_id": event.job_id,
        "at": event.at.isoformat(),
        "stage": event.stage,
        "state": str(event.state) if event.state else None,
        "message": event.message,
        "duration_s": event.duration_s,
        "study_instance_uid": event.study_instance_uid,
    }


def _event_line(event: Any) -> str:
    style = STATE_STYLES.get(str(event.state), "")
    if "fail" in (event.message or "").lower() or str(event.state) == "failed":
        style = "bold red"
    duration = f" ({_fmt_s(event.duration_s)})" if event.duration_s is not None else ""
    stamp = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"[dim]{stamp}[/] job {event.job_id} [{style}]{event.stage:<10} {event.state or '':<10}[/]"
        f"{duration} {event.message or ''}".rstrip()
    )


_SINCE = re.compile(r"^(\d+)([smhd])$")


def _parse_since(text: str) -> datetime:
    match = _SINCE.match(text)
    if not match:
        raise typer.BadParameter("use e.g. 30s, 10m, 2h, 1d")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
    return datetime.now(UTC) - timedelta(**{unit: int(match[1])})


@app.command()
def logs(
    config: ConfigOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    job: Annotated[int | None, typer.Option("--job", help="Only this job.")] = None,
    since: Annotated[str | None, typer.Option(help="Only events newer than e.g. 10m.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    poll_s: Annotated[float, typer.Option(hidden=True)] = 0.5,
) -> None:
    """Job events (state changes and stage timings), oldest first; -f follows live."""
    jobs_store = _jobs_store(config)
    cutoff = _parse_since(since) if since else None
    last_id = 0
    while True:
        events = jobs_store.events_after(last_id, job_id=job)
        for event in events:
            last_id = event.id
            if cutoff is not None and event.at < cutoff:
                continue
            if as_json:
                sys.stdout.write(json.dumps(_event_json(event)) + "\n")
            else:
                console.print(_event_line(event), highlight=False)
        sys.stdout.flush()
        if not follow:
            return
        if not events:
            time.sleep(poll_s)


@app.command()
def echo(
    peer: Annotated[str, typer.Argument(help="AE@HOST:PORT")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "SCPNODE",
) -> None:
    """C-ECHO a DICOM node."""
    from scp_node.dicom.scu import Peer
    from scp_node.dicom.scu import echo as c_echo

    try:
        target = Peer.parse(peer)
        status = c_echo(target, calling_ae=calling_ae)
    except (ValueError, NodeError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
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


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (searched recursively).")],
    to: Annotated[str, typer.Option("--to", help="AE@HOST:PORT")],
    calling_ae: Annotated[str, typer.Option(help="Our AE title.")] = "SCPNODE",
) -> None:
    """C-STORE DICOM files to a node, with a progress bar and a status per failure."""
    from rich.progress import Progress

    from scp_node.dicom.scu import Peer, SendResult, send_files

    try:
        target = Peer.parse(to)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    files = _dicom_files(paths)
    if not files:
        err_console.print("[bold red]error:[/] no DICOM files found")
        raise typer.Exit(1)
    with Progress(console=err_console) as progress:
        task = progress.add_task(f"sending to {target}", total=len(files))

        def _advance(_result: SendResult) -> None:
            progress.advance(task)

        try:
            results = send_files(files, target, calling_ae=calling_ae, on_sent=_advance)
        except NodeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(1) from exc
    failed = [r for r in results if not r.ok]
    for r in failed:
        status = f"0x{r.status:04X}" if r.status is not None else "-"
        err_console.print(f"[red]failed[/] {r.path} status {status} {r.error or ''}")
    console.print(f"sent {len(results) - len(failed)}/{len(results)} to {target}")
    if failed:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Create or migrate the job table to the latest schema."""
    from scp_node.app import open_database

    open_database(_settings(config))
    console.print("database at latest schema")


@model_app.command("train")
def model_train(
    model_dir: Annotated[Path, typer.Argument(help="models/<name> with train.toml")],
    data_dir: Annotated[Path, typer.Option(help="Folder with ct-abdomen-a/ etc.")] = Path(
        "../shared/data"
    ),
    seed: int = 0,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this long.")] = None,
) -> None:
    """Train a model on the shared data (see the model's train.toml)."""
    from scp_node.training.train import train

    result = train(model_dir, data_dir, seed=seed, max_minutes=max_minutes)
    console.print(result)


@model_app.command("evaluate")
def model_evaluate(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>")],
    data_dir: Annotated[Path, typer.Option(help="Folder with ct-abdomen-b/.")] = Path(
        "../shared/data"
    ),
) -> None:
    """Dice per label on held-out subject B, through DICOM."""
    from scp_node.training.evaluate import evaluate_on_dicom

    scores = evaluate_on_dicom(
        model_dir, data_dir / "ct-abdomen-b" / "dicom", data_dir / "ct-abdomen-b" / "labels.nii.gz"
    )
    sys.stdout.write(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    app()
