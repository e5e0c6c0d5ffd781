"""``scp-node model``: train, prune, quantise, evaluate and export models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from scp_node.cli.common import ConfigOption, console, err_console, load, on_error

if TYPE_CHECKING:
    from scp_node.inference.registry import ModelSpec
    from scp_node.inference.verify import VariantSelection
    from scp_node.settings import WorkerSection
    from scp_node.training.compare import Comparison

__all__ = ["app"]

app = typer.Typer(help="Train and evaluate models.", no_args_is_help=True)

DataDirOption = Annotated[
    Path, typer.Option(help="The shared data folder (ct-abdomen-a/, ct-abdomen-b/, ...).")
]


@app.command("train")
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
    with on_error(default=2):
        result = train(
            model_dir, data_dir, seed=seed, max_minutes=max_minutes, device=device, epochs=epochs
        )
    console.print(result)


@app.command("evaluate")
def model_evaluate(
    model_dir: Annotated[
        Path, typer.Argument(help="models/<name>, or a comparison TOML (its table of saved runs)")
    ],
    data_dir: DataDirOption = Path("../shared/data"),
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Variant(s) to evaluate (fp32, pruned, ...); default: all in the card."),
    ] = None,
    subject: Annotated[str, typer.Option(help="Held-out DICOM subject folder.")] = "ct-abdomen-b",
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 1,
    label: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE: the card label NAME is VALUE in the reference file (repeatable); "
            "default: train.toml's [labels]."
        ),
    ] = None,
    runs: Annotated[
        Path, typer.Option(help="With a comparison TOML: the --out its runs were saved to.")
    ] = Path("var/compare"),
) -> None:
    """Dice and HD95 per label on held-out subject B through the worker's path.

    DICOM series -> load_volume -> Predictor -> SEG -> read back with highdicom -> compared
    with the reference labels in physical space. Prints JSON {variant: scores}. A folder
    without train.toml (an nnU-Net folder or bundle, a 3-D row of `model compare`) needs
    --label for each of its labels (subject B's file holds TotalSegmentator's `total` map:
    liver=5, spleen=1, ...).

    Given a comparison TOML instead (`model compare`'s), it prints that comparison's table
    and shipping rule from the runs saved under --runs (each run was evaluated this same
    way when it was trained), as `model compare --table-only` does.
    """
    if model_dir.suffix == ".toml":
        from scp_node.errors import ModelError
        from scp_node.training.compare import Comparison, load_results

        with on_error(default=2):
            comparison = Comparison.from_file(model_dir)
            saved = load_results(runs, comparison)
            if not saved:
                raise ModelError(f"no saved runs of {model_dir} under {runs} (see --runs)")
        _print_comparison(model_dir, comparison, saved, runs)
        return

    import torch
    from rich.progress import Progress

    from scp_node.inference.registry import REFERENCE_VARIANT, ModelSpec
    from scp_node.training.evaluate import evaluate_series

    torch.set_num_threads(threads)
    results: dict[str, dict[str, float]] = {}
    with on_error(default=2):
        reference_values = _label_values(label) if label else None
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
                    reference_values=reference_values,
                )
                progress.advance(task)
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


def _label_values(pairs: list[str]) -> dict[str, int]:
    """``["liver=5", ...]`` -> ``{"liver": 5, ...}``.

    Raises
    ------
    ModelError
        A pair is not NAME=INTEGER.
    """
    from scp_node.errors import ModelError

    values: dict[str, int] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise ModelError(f"--label {pair!r}: expected NAME=VALUE, e.g. liver=5")
        values[name.strip()] = int(value)
    return values


@app.command("prune")
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
    with on_error(default=2, also=(ValueError,)):
        result = prune_model(
            model_dir, data_dir, ratio=ratio, epochs=epochs, lr_scale=lr_scale, seed=seed, name=name
        )
    console.print(
        f"widths {list(result.widths_before)} -> {list(result.widths_after)}, "
        f"FLOPs/slice {result.flops_before / 1e6:.0f} M -> {result.flops_after / 1e6:.0f} M"
    )
    if result.fine_tune is not None:
        console.print(result.fine_tune)


@app.command("quantize")
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
    with on_error(default=2):
        written = quantize_model(
            model_dir,
            data_dir,
            source=source,
            methods=tuple(method or ["fx", "ort"]),
            engine=engine,
            calibration_slices=slices,
        )
    for variant, file in written.items():
        console.print(f"variant {variant}: {model_dir / file}")


@app.command("export")
def model_export(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the file into.")],
    variant: Annotated[str, typer.Option(help="state_dict variant to export.")] = "fp32",
    fmt: Annotated[str, typer.Option("--format", help="torchscript or onnx.")] = "onnx",
) -> None:
    """Export a variant as a self-contained TorchScript or ONNX file (for other runtimes)."""
    from scp_node.training.variants import export_model

    with on_error(default=2):
        path = export_model(model_dir, variant, fmt, out_dir)
    console.print(f"wrote {path} (input padded to the network's size multiple)")


@app.command("reference")
def model_reference(
    model_dir: Annotated[Path, typer.Argument(help="models/<name>")],
    dicom_dir: Annotated[Path, typer.Argument(help="A DICOM series the model accepts.")],
    slices: Annotated[int, typer.Option(help="Slices kept in the reference case.")] = 6,
    min_dice: Annotated[float, typer.Option(help="The card's verify.min_dice.")] = 0.99,
) -> None:
    """Store the reference case start-up verification uses (reference.npz + [verify])."""
    from scp_node.training.reference import make_reference_case

    with on_error(default=2):
        case = make_reference_case(model_dir, dicom_dir, slices=slices, min_dice=min_dice)
    console.print(
        f"reference case: {case.inputs.shape[0]} slices, outputs of {', '.join(case.logits)}"
    )


@app.command("status")
def model_status(
    config: ConfigOption = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="Model folder (default: the configured worker's).")
    ] = None,
    variant: Annotated[
        str | None, typer.Option(help="Variant to ask for (auto, a name); default: config.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Which variant the worker runs on this machine: start-up verification and, for
    ``auto``, the timings (from the per-machine cache when it is valid)."""
    from scp_node.inference.predictor import Predictor
    from scp_node.inference.registry import ModelSpec
    from scp_node.inference.verify import select_variant

    settings = load(config)
    worker = settings.worker
    folder = model_dir or worker.models_dir / worker.model
    with on_error(default=2):
        spec = ModelSpec.from_model_dir(folder)
        if spec.kind == "volume":
            selection = _volume_selection(spec, worker, variant)
        else:
            _predictor, selection = select_variant(
                spec,
                lambda: Predictor(worker.device, threads=worker.threads),
                requested=variant or worker.variant or None,
                cache_dir=worker.variant_cache_dir,
            )
    if as_json:
        sys.stdout.write(json.dumps(selection.to_json(), indent=2) + "\n")
        return
    source = "timings from this machine's cache" if selection.cached else "measured now"
    console.print(
        f"model {spec.name} {spec.version} on {selection.device}: requested "
        f"{selection.requested}, running [bold]{selection.chosen}[/bold]"
        + (f" ({source})" if selection.timings_ms else "")
        + f"; verification took {selection.seconds:.1f} s",
        soft_wrap=True,
    )
    if not selection.verified:
        console.print("not verified: the card has no reference case ([verify] file)")
    for check in selection.checks:
        timing = ""
        if check.ms_per_slice is not None:
            unit = "patch" if spec.kind == "volume" else "slice"
            timing = f", {check.ms_per_slice:.1f} ms/{unit}"
            timing += f" (best of {check.timed_runs})" if check.timed_runs else " (first run)"
        console.print(f"  {check.describe()}{timing}", markup=False, soft_wrap=True)


@app.command("optimize")
def model_optimize(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="models/<name> (our card, TorchScript, ONNX, nnU-Net folder, MONAI bundle)"
        ),
    ],
    calibration: Annotated[
        Path | None, typer.Option(help="Folder of DICOM series to calibrate int8 on.")
    ] = None,
    holdout: Annotated[
        Path | None,
        typer.Option(help="Folder of DICOM series for the gate (default: odd calibration slices)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Shared data (calibrate on train.toml's subject).")
    ] = None,
    source: Annotated[str, typer.Option(help="fp32 variant to quantise.")] = "fp32",
    name: Annotated[str | None, typer.Option(help="Variant name written to the card.")] = None,
    min_dice: Annotated[
        float, typer.Option(help="Agreement gate: per-label Dice vs the fp32 source.")
    ] = 0.98,
    slices: Annotated[int, typer.Option(help="Calibration slices.")] = 32,
    patches: Annotated[int, typer.Option(help="Calibration patches (3-D models).")] = 8,
    engine: Annotated[
        list[str] | None,
        typer.Option(
            help="ort, openvino (repeatable; 3-D default: installed ones; 2-D default: ort)."
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads.")] = 2,
) -> None:
    """int8 ONNX Runtime variant (reduce_range, correct without VNNI) behind an agreement gate.

    The variant is kept (recorded in model.toml) only if every label's Dice against the fp32
    source on held-out slices is >= --min-dice; every label is reported. Exit status 1 when
    the gate refuses it. nnU-Net folders and MONAI bundles (3-D): fp32 and int8 ONNX
    variants per engine (ONNX Runtime, OpenVINO) at the plans' patch or the bundle
    inferer's roi_size, gated on whole held-out volumes, kept ones recorded with
    cpu = "auto" and a reference patch; exit status 1 when none is kept.
    """
    import torch

    from scp_node.inference.registry import ModelSpec
    from scp_node.training.optimize import optimize_model

    torch.set_num_threads(threads)
    with on_error(default=2):
        if ModelSpec.from_model_dir(model_dir).kind == "volume":
            _optimize_volume(model_dir, calibration, holdout, min_dice, patches, engine)
            return
        engines = engine or ["ort"]
        results = [
            optimize_model(
                model_dir,
                calibration=calibration,
                holdout=holdout,
                data_dir=data_dir,
                source=source,
                name=name if len(engines) == 1 else None,
                min_dice=min_dice,
                slices=slices,
                engine=one,
            )
            for one in engines
        ]
    for result in results:
        console.print(result.describe(), markup=False, soft_wrap=True)
    if not all(result.kept for result in results):
        raise typer.Exit(1)


def _optimize_volume(
    model_dir: Path,
    calibration: Path | None,
    holdout: Path | None,
    min_dice: float,
    patches: int,
    engines: list[str] | None,
) -> None:
    from scp_node.errors import ModelError
    from scp_node.inference.runtime.onnx import ENGINES, Engine
    from scp_node.training.optimize_volume import optimize_volume_model

    if calibration is None:
        raise ModelError("3-D models need --calibration (a folder of DICOM series)")
    chosen: list[Engine] | None = None
    if engines:
        chosen = [e for e in ENGINES if e in engines]
        unknown = sorted(set(engines) - set(ENGINES))
        if unknown:
            raise ModelError(f"unknown engine {unknown[0]!r} (known: {', '.join(ENGINES)})")
    result = optimize_volume_model(
        model_dir,
        calibration=calibration,
        holdout=holdout,
        min_dice=min_dice,
        patches=patches,
        engines=chosen,
    )
    console.print(result.describe(), markup=False, soft_wrap=True)
    if not result.kept:
        raise typer.Exit(1)
    console.print(f"kept (fastest first): {', '.join(result.kept)}; cpu = auto", markup=False)


def _volume_selection(
    spec: ModelSpec, worker: WorkerSection, variant: str | None
) -> VariantSelection:
    from scp_node.inference.runtime import load_runtime
    from scp_node.inference.runtime.volume import VolumePredictor
    from scp_node.inference.verify_volume import select_volume_variant

    def make(name: str) -> VolumePredictor:
        runtime = load_runtime(spec, worker.device, threads=worker.threads, variant=name)
        assert isinstance(runtime, VolumePredictor)
        return runtime

    _runtime, selection = select_volume_variant(
        spec, make, requested=variant or worker.variant or None, cache_dir=worker.variant_cache_dir
    )
    return selection


@app.command("compare")
def model_compare(
    comparison_file: Annotated[Path, typer.Argument(help="Comparison TOML (base folder, rows).")],
    out: Annotated[Path, typer.Option(help="Runs go to <out>/<row>/seed-<seed>/.")] = Path(
        "var/compare"
    ),
    data_dir: DataDirOption = Path("../shared/data"),
    resume: Annotated[bool, typer.Option(help="Keep saved runs, train the missing ones.")] = False,
    row: Annotated[list[str] | None, typer.Option(help="Only this row (repeatable).")] = None,
    table_only: Annotated[
        bool, typer.Option("--table-only", help="Train nothing: print the table of saved runs.")
    ] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads (1 is fastest here).")] = 1,
    device: Annotated[str, typer.Option(help="Training device: cpu, cuda or auto.")] = "cpu",
    retime_runs: Annotated[
        bool,
        typer.Option(
            "--retime",
            help="Train nothing: time every saved run's network on a 200-slice study again "
            "(on a quiet machine), then print the table.",
        ),
    ] = False,
) -> None:
    """Train each row x seed of a comparison file, evaluate all the same way, print the table.

    Every run is evaluated on subject B through the worker's path (as `model evaluate`,
    fp32) and on subject A's held-out blocks; its figures are saved as result.json, so
    rows can be trained in separate sessions (--resume, --row) and the table rebuilt from
    what is saved (--table-only). A run's study time is taken after its training, under
    whatever ran beside it; --retime times all saved runs again with --threads, so the
    column compares like with like. Writes <out>/table.md and <out>/table.json.
    """
    import torch

    from scp_node.training.compare import Comparison, compare, load_results, retime

    def report(record: dict[str, Any]) -> None:
        scores = ", ".join(
            f"{key} {value:.3f}"
            for key, value in record["heldout_b"].items()
            if key.startswith(("dice_", "hd95_mm_"))
        )
        err_console.print(
            f"{record['row']['name']} seed {record['seed']}: "
            f"{record['train']['minutes']:.1f} min, B {scores}"
        )

    torch.set_num_threads(threads)
    with on_error(default=2):
        comparison = Comparison.from_file(comparison_file)
        if table_only:
            results = load_results(out, comparison)
        elif retime_runs:
            results = retime(comparison, out, rows=row, threads=threads)
        else:
            results = compare(
                comparison, out, data_dir, resume=resume, rows=row, device=device, on_run=report
            )
    _print_comparison(comparison_file, comparison, results, out)


def _print_comparison(
    comparison_file: Path, comparison: Comparison, results: list[dict[str, Any]], out: Path
) -> None:
    """Print a comparison's table and shipping rule; write <out>/table.md and table.json."""
    from rich.table import Table

    from scp_node.training.compare import ship_rule, summarise

    header, lines = summarise(results)
    table = Table(*header, title=f"{comparison_file} ({len(results)} runs)")
    for line in lines:
        table.add_row(*line)
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(line) + " |" for line in lines]
    verdicts = ship_rule(results, comparison)
    if verdicts:
        rule = Table(
            "row",
            "organ",
            "seeds",
            "B Dice mean",
            "B Dice min",
            "B voxels",
            "ships",
            "why",
            title=(
                f"Ship an organ only where held-out B Dice >= {comparison.ship_min_dice} "
                f"for every seed (>= {comparison.ship_min_seeds} seeds)"
            ),
        )
        markdown += [
            "",
            f"Shipping rule: held-out B Dice >= {comparison.ship_min_dice} for every seed, "
            f">= {comparison.ship_min_seeds} seeds.",
            "",
            "| row | organ | seeds | B Dice mean | B Dice min | B voxels | ships | why |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for verdict in verdicts:
            cells = [
                verdict.row,
                verdict.label,
                str(verdict.seeds),
                f"{verdict.mean_dice:.3f}",
                f"{verdict.min_dice:.3f}",
                f"{verdict.reference_voxels:.0f}",
                "yes" if verdict.qualifies else "no",
                verdict.why,
            ]
            rule.add_row(*cells)
            markdown.append("| " + " | ".join(cells) + " |")
        console.print(rule)
        qualifying = sorted({f"{v.label} ({v.row})" for v in verdicts if v.qualifies})
        console.print(f"organs that qualify: {', '.join(qualifying) or 'none'}", markup=False)
    (out / "table.md").write_text("\n".join(markdown) + "\n")
    (out / "table.json").write_text(json.dumps(results, indent=2) + "\n")
