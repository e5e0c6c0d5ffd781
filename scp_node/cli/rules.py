"""``scp-node rules test STUDY_DIR``: which model takes which series of a study, and why.

It runs the node's own code on files in a folder: the Storage SCP's instance check (what
intake would record), the settle-time routing of each model (:func:`route_study`) and the
worker's precise stack choice (:func:`choose_stack` on :func:`read_stacks`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from scp_node.cli.common import ConfigOption, console, fail, load, on_error

__all__ = ["app", "study_routing"]

app = typer.Typer(help="Series routing rules of the served models.", no_args_is_help=True)


@dataclass(frozen=True)
class _Files:
    series: dict[str, list[Path]]
    facts: dict[str, Any]
    refused: dict[str, str]


def _read_folder(folder: Path) -> _Files:
    """Every file under ``folder`` through the Storage SCP's check, grouped by series."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from scp_node.dicom.validate import InstanceHeader, InstanceRejectedError, check_instance
    from scp_node.queue.records import SeriesFacts

    series: dict[str, list[Path]] = defaultdict(list)
    headers: dict[str, list[InstanceHeader]] = defaultdict(list)
    refused: dict[str, str] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True).get("SOPInstanceUID", ""))
            header = check_instance(path.read_bytes(), sop_uid)
        except (InvalidDicomError, InstanceRejectedError, OSError, ValueError) as exc:
            refused[str(path.relative_to(folder))] = str(exc)
            continue
        series[header.series_instance_uid].append(path)
        headers[header.series_instance_uid].append(header)
    facts: dict[str, Any] = {}
    for uid, found in headers.items():

        def first(attr: str, found: list[InstanceHeader] = found) -> Any:
            return next((getattr(h, attr) for h in found if getattr(h, attr)), None)

        facts[uid] = SeriesFacts(
            series_instance_uid=uid,
            modality=first("modality"),
            series_description=first("series_description"),
            body_part_examined=first("body_part_examined"),
            slice_thickness_mm=first("slice_thickness_mm"),
            orientation=first("orientation"),
            frame_count=sum(h.frame_count for h in found),
        )
    return _Files(dict(series), facts, refused)


def study_routing(folder: Path, models_dir: Path, models: list[str]) -> dict[str, Any]:
    """What each model would do with the study in ``folder``.

    Returns
    -------
    dict
        ``{"files_refused": {file: why}, "models": {name: {...}}}`` where each model has
        ``routed`` (the settle-time decision), ``reason`` (why not, or None), ``chosen``
        (the series the worker would take, or None), ``series`` (uid -> "chosen" or why
        not) and ``summary`` (the worker's one-line selection summary); a model whose card
        cannot be read has only ``down`` (the reason).
    """
    from scp_node.dicom.selection import choose_stack, route_series, route_study
    from scp_node.dicom.volume import read_stacks
    from scp_node.errors import ModelError
    from scp_node.inference.registry import load_model_spec

    files = _read_folder(folder)
    stacks = read_stacks(files.series)
    result: dict[str, Any] = {"files_refused": files.refused, "models": {}}
    for name in models:
        try:
            spec = load_model_spec(models_dir, name)
        except ModelError as exc:
            result["models"][name] = {"down": str(exc)}
            continue
        rules = spec.series.rules()
        reason = route_study(list(files.facts.values()), rules)
        selection = choose_stack(stacks, rules)
        per_series: dict[str, str] = {}
        for uid, facts in sorted(files.facts.items()):
            per_series[uid] = route_series(facts, rules) or "routed"
        for stack_name, why in {**selection.rejected, **selection.passed_over}.items():
            uid = stack_name.split(" ", 1)[0]
            if per_series.get(uid) == "routed":
                per_series[uid] = why
        chosen = selection.series_instance_uid if reason is None else None
        if chosen is not None:
            per_series[chosen] = "chosen"
        result["models"][name] = {
            "version": spec.version,
            "routed": reason is None,
            "reason": reason,
            "chosen": chosen,
            "series": per_series,
            "summary": selection.summary(),
        }
    return result


@app.command("test")
def rules_test(
    study_dir: Annotated[Path, typer.Argument(help="Folder with the study's DICOM files.")],
    config: ConfigOption = None,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model(s) to test; default: worker.models."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of text.")] = False,
) -> None:
    """Show which model takes which series of STUDY_DIR, and why the others not."""
    settings = load(config)
    if not study_dir.is_dir():
        raise fail(f"{study_dir} is not a folder", code=2)
    with on_error():
        report = study_routing(
            study_dir, settings.worker.models_dir, model or list(settings.worker.models)
        )
    if as_json:
        console.print_json(json.dumps(report))
        return
    for name, found in report["models"].items():
        if "down" in found:
            console.print(
                f"[bold]{escape(name)}[/]: [red]model down[/]: {escape(found['down'])}",
                soft_wrap=True,
            )
            continue
        head = (
            f"takes series {found['chosen']}"
            if found["chosen"]
            else f"no job: {found['reason'] or found['summary']}"
        )
        console.print(
            f"[bold]{escape(name)}[/] {escape(found['version'])}: {escape(head)}", soft_wrap=True
        )
        for uid, why in found["series"].items():
            console.print(f"  {uid}: {escape(why)}", soft_wrap=True)
    for path, why in report["files_refused"].items():
        console.print(f"[yellow]file refused[/] {escape(path)}: {escape(why)}", soft_wrap=True)
