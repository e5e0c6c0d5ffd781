"""The ``scp-node`` command line (typer + rich)."""

from __future__ import annotations

import json
import re
import ssl
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
def web(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Override web.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Override web.port.")] = None,
) -> None:
    """Run only the web dashboard, /metrics and /healthz (against the configured database)."""
    from scp_node.app import run_web

    settings = _settings(config, _overrides(web__host=host, web__port=port))
    _configure_logging(settings, "web.log")
    try:
        run_web(settings)
    except (NodeError, OSError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc


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


def _database(config: Path | None) -> Any:
    from scp_node.app import open_database

    return open_database(_settings(config))


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
    from scp_node.queue.models import STAGE_ORDER, JobState

    try:
        wanted = JobState(state) if state else None
    except ValueError as exc:
        err_console.print(f"[bold red]error:[/] unknown state {state!r}")
        raise typer.Exit(2) from exc
    store = _database(config).views
    views = store.list(state=wanted, limit=limit)
    if as_json:
        sys.stdout.write(json.dumps([v.to_json() for v in views], indent=2) + "\n")
        return
    table = Table(title="scp-node jobs", header_style="bold", expand=True)
    # Identity columns never shrink; the wide ones fold so the table fits any terminal.
    for column in ("id", "state", "try"):
        table.add_column(column, no_wrap=True, min_width=len(column))
    for column in ("model", "study", "date", "mod", "series", "slices", "age", "outcome"):
        table.add_column(column, overflow="fold", ratio=1)
    for column in ("time per stage", "error"):
        table.add_column(column, overflow="fold", ratio=3 if column == "time per stage" else 1)
    from scp_node.web.health import age
    from scp_node.web.server import series_summary

    for v in views:
        series = series_summary(store, v)
        table.add_row(
            str(v.id),
            f"[{STATE_STYLES.get(str(v.state), '')}]{v.state}[/]",
            f"{v.attempts}/{v.max_attempts}",
            v.model,
            "…" + v.study_instance_uid[-12:],
            v.study_date or "",
            series["modality"],
            series["series_description"],
            str(series["slices"]),
            age(v.created_at),
            v.outcome or "",
            " ".join(
                f"{stage} {_fmt_s(v.durations[stage])}"
                for stage in STAGE_ORDER
                if stage in v.durations
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
    from scp_node.errors import JobNotFoundError

    jobs_store = _database(ctx.obj).views
    try:
        view = jobs_store.get(job_id)
    except JobNotFoundError as exc:
        err_console.print(f"[bold red]error:[/] no job {job_id}")
        raise typer.Exit(1) from exc
    events = jobs_store.events_after(0, job_id=job_id, limit=10_000)
    if as_json:
        payload = view.to_json()
        payload["events"] = [e.to_json() for e in events]
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
        getattr(_database(config).admin, action)(job_id)
    except NodeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"job {job_id} {done}")


@jobs_app.command("retry")
def jobs_retry(ctx: typer.Context, job_id: int) -> None:
    """Run a failed or cancelled job again (or resend its SEG if only delivery failed)."""
    _job_action(ctx.obj, job_id, "retry", "requeued")


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: int) -> None:
    """Cancel a job that has not finished."""
    _job_action(ctx.obj, job_id, "cancel", "cancelled")


LEVEL_STYLES = {"error": "bold red", "warning": "yellow", "info": "green"}


def _event_line(event: Any) -> str:
    from rich.markup import escape

    level = str(event.level)
    style = STATE_STYLES.get(str(event.state), "")
    if "fail" in (event.message or "").lower() or str(event.state) == "failed":
        style = "bold red"
    duration = f" ({_fmt_s(event.duration_s)})" if event.duration_s is not None else ""
    stamp = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    message = escape(event.message or "")
    if level != "info":
        message = f"[{LEVEL_STYLES[level]}]{message}[/]"
    return (
        f"[dim]{stamp}[/] [{LEVEL_STYLES[level]}]{level.upper():<7}[/] job {event.job_id} "
        f"[{style}]{event.stage:<10} {event.state or '':<10}[/]{duration} {message}".rstrip()
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
    state: Annotated[
        str | None, typer.Option("--state", help="Only events that left the job in this state.")
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Only this Study Instance UID (or its prefix).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Only events newer than e.g. 10m.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
    poll_s: Annotated[float, typer.Option(hidden=True)] = 0.5,
) -> None:
    """Job events (state changes and stage timings), oldest first; -f follows live."""
    jobs_store = _database(config).views
    cutoff = _parse_since(since) if since else None
    last_id = 0
    while True:
        events = jobs_store.events_after(last_id, job_id=job)
        for event in events:
            last_id = event.id
            if cutoff is not None and event.at < cutoff:
                continue
            if state is not None and event.state != state:
                continue
            if study is not None and not event.study_instance_uid.startswith(study):
                continue
            if as_json:
                sys.stdout.write(json.dumps(event.to_json()) + "\n")
            else:
                console.print(_event_line(event), highlight=False)
        sys.stdout.flush()
        if not follow:
            return
        if not events:
            time.sleep(poll_s)


TlsOption = Annotated[
    bool,
    typer.Option("--tls", help="Use TLS with the [tls] files of --config (CA, our cert and key)."),
]


def _client_tls(config: Path | None, tls: bool) -> ssl.SSLContext | None:
    if not tls:
        return None
    from scp_node.dicom.tls import client_context_from_settings

    try:
        return client_context_from_settings(_settings(config).tls)
    except NodeError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from exc


@app.command()
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
    try:
        target = Peer.parse(peer)
        status = c_echo(target, calling_ae=calling_ae, ssl_context=context)
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
        err_console.print("[bold red]error:[/] no DICOM files found")
        raise typer.Exit(1)
    with Progress(console=err_console) as progress:
        task = progress.add_task(f"sending to {target}", total=len(files))

        def _advance(_result: SendResult) -> None:
            progress.advance(task)

        try:
            results = send_files(
                files, target, calling_ae=calling_ae, on_sent=_advance, ssl_context=context
            )
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


DataDirOption = Annotated[
    Path, typer.Option(help="The shared data folder (ct-abdomen-a/, ct-abdomen-b/, ...).")
]


def _model_errors(exc: Exception) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(2)


@model_app.command("train")
def model_train(
    model_dir: Annotated[Path, typer.Argument(help="models/<name> with train.toml")],
    data_dir: DataDirOption = Path("../shared/data"),
    seed: int = 0,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this long.")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is fastest here).")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto (CUDA: autocast).")] = "cpu",
    epochs: Annotated[int | None, typer.Option(help="Override train.toml's epochs.")] = None,
) -> None:
    """Train a model on the shared data (see the model's train.toml); writes weights.pt."""
    import torch

    from scp_node.training.train import train

    torch.set_num_threads(threads)
    try:
        result = train(
            model_dir, data_dir, seed=seed, max_minutes=max_minutes, device=device, epochs=epochs
        )
    except NodeError as exc:
        raise _model_errors(exc) from exc
    console.print(result)


@model_app.command("evaluate")
def model_evaluate(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>")],
    data_dir: DataDirOption = Path("../shared/data"),
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Variant(s) to evaluate (fp32, pruned, ...); default: all in the card."),
    ] = None,
    subject: Annotated[str, typer.Option(help="Held-out DICOM subject folder.")] = "ct-abdomen-b",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Dice and HD95 per label on held-out subject B through the worker's path.

    DICOM series -> load_volume -> Predictor -> SEG -> read back with highdicom -> compared
    with the reference labels in physical space. Prints JSON {variant: scores}.
    """
    import torch
    from rich.progress import Progress

    from scp_node.inference.registry import REFERENCE_VARIANT, ModelSpec
    from scp_node.training.evaluate import evaluate_series

    torch.set_num_threads(threads)
    results: dict[str, dict[str, float]] = {}
    try:
        spec = ModelSpec.from_model_dir(model_dir)
        names = variant or [REFERENCE_VARIANT, *spec.variants]
        with Progress(console=err_console) as progress:
            task = progress.add_task(f"evaluating on {subject}", total=len(names))
            for name in names:
                progress.update(task, description=f"evaluating {name} on {subject}")
                results[name] = evaluate_series(
                    model_dir,
                    data_dir / subject / "dicom",
                    data_dir / subject / "labels.nii.gz",
                    variant=name,
                )
                progress.advance(task)
    except NodeError as exc:
        raise _model_errors(exc) from exc
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


@model_app.command("prune")
def model_prune(
    model_dir: Annotated[Path, typer.Argument(help="models/<name> (attention_unet)")],
    data_dir: DataDirOption = Path("../shared/data"),
    ratio: Annotated[float, typer.Option(help="Fraction of channels removed per level.")] = 0.5,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs (0: none).")] = 15,
    lr_scale: Annotated[float, typer.Option(help="Fine-tuning LR = this x train.toml lr.")] = 0.3,
    name: Annotated[str, typer.Option(help="Variant name written to the card.")] = "pruned",
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Structured channel pruning + fine-tuning; records variant NAME in model.toml."""
    import torch

    from scp_node.training.variants import prune_model

    torch.set_num_threads(threads)
    try:
        result = prune_model(
            model_dir, data_dir, ratio=ratio, epochs=epochs, lr_scale=lr_scale, seed=seed, name=name
        )
    except (NodeError, ValueError) as exc:
        raise _model_errors(exc) from exc
    console.print(
        f"widths {list(result.widths_before)} -> {list(result.widths_after)}, "
        f"FLOPs/slice {result.flops_before / 1e6:.0f} M -> {result.flops_after / 1e6:.0f} M"
    )
    if result.fine_tune is not None:
        console.print(result.fine_tune)


@model_app.command("quantize")
def model_quantize(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>")],
    data_dir: DataDirOption = Path("../shared/data"),
    source: Annotated[str, typer.Option(help="state_dict variant to quantise.")] = "pruned",
    method: Annotated[
        list[str] | None, typer.Option(help="fx (torch FX int8) and/or ort (ONNX Runtime QDQ).")
    ] = None,
    engine: Annotated[str, typer.Option(help="torch quantized engine for fx.")] = "x86",
    slices: Annotated[int, typer.Option(help="Calibration slices of the training subject.")] = 32,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
) -> None:
    """Static int8 post-training quantisation; records the int8 variants in model.toml.

    Evaluate them (`model evaluate`) and benchmark them (`python -m bench.model`) before
    pointing the card's [runtime] cpu at one.
    """
    import torch

    from scp_node.training.variants import quantize_model

    torch.set_num_threads(threads)
    try:
        written = quantize_model(
            model_dir,
            data_dir,
            source=source,
            methods=tuple(method or ["fx", "ort"]),
            engine=engine,
            calibration_slices=slices,
        )
    except NodeError as exc:
        raise _model_errors(exc) from exc
    for variant, file in written.items():
        console.print(f"variant {variant}: {model_dir / file}")


@model_app.command("export")
def model_export(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the file into.")],
    variant: Annotated[str, typer.Option(help="state_dict variant to export.")] = "fp32",
    fmt: Annotated[str, typer.Option("--format", help="torchscript or onnx.")] = "onnx",
) -> None:
    """Export a variant as a self-contained TorchScript or ONNX file (for other runtimes)."""
    from scp_node.training.variants import export_model

    try:
        path = export_model(model_dir, variant, fmt, out_dir)
    except NodeError as exc:
        raise _model_errors(exc) from exc
    console.print(f"wrote {path} (input padded to the network's size multiple)")


if __name__ == "__main__":
    app()
