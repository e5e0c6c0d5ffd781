"""Architecture and loss comparison: train rows x seeds, evaluate each the same way, tabulate.

A comparison file (TOML) names a base model folder (its ``train.toml`` and ``model.toml``
are the template) and rows; each row overrides the network, the 2.5-D context, the loss
and any ``[train]`` key. Every (row, seed) is trained into ``<out>/<row>/seed-<seed>/``
(its own ``train.toml``, ``model.toml`` and ``weights.pt``) and evaluated:

* subject B through the worker's path (:func:`scp_node.training.evaluate.evaluate_series`,
  fp32), the same evaluation that produced the shipped card's metrics;
* subject A's held-out blocks (the slices training used only for early stopping), with
  MONAI's ``DiceMetric`` (pooled over the held-out slices) and
  ``HausdorffDistanceMetric(percentile=95)`` (per contiguous block, in mm, then averaged).

Each run's figures go to ``result.json`` next to its weights, so rows can be trained in
separate sessions (or on another machine) and the table rebuilt from what is saved.

Example::

    base = "../models/ct-abdomen"      # relative to this file
    seeds = [0, 1, 2]
    max_minutes = 30                   # per run; optional

    [[rows]]
    name = "2d-attention-unet"
    architecture = "attention_unet"
    params = { base_channels = 16, depth = 4 }
    context_slices = 0                 # 1 -> 3 slices, 2 -> 5 slices (in_channels follows)
    loss = "dice+wce"                  # or "dice"
    edge_weight = 0.0
    train = { epochs = 60 }            # any [train] key of train.toml
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import tomllib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scp_node.errors import ModelError
from scp_node.inference.nets import build_network
from scp_node.inference.preprocess import stack_context
from scp_node.training.data import LOSSES, TRAIN_FILE, TrainConfig, load_subject, split_slices
from scp_node.training.variants import toml_value

__all__ = [
    "Comparison",
    "RowSpec",
    "compare",
    "flops_per_slice",
    "load_results",
    "summarise",
]

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
CARD_FILE = "model.toml"
#: A 512 x 512 slice of 0.98 mm pixels (subject B, a typical abdominal CT) at 3 mm.
STUDY_SLICES = 200
_CARD_SECTIONS_DROPPED = ("variants", "metrics", "verify", "runtime")


@dataclass(frozen=True)
class RowSpec:
    """One row of the comparison: what differs from the base recipe."""

    name: str
    architecture: str
    params: dict[str, Any] = field(default_factory=dict)
    context_slices: int = 0
    loss: str = "dice+wce"
    edge_weight: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ModelError(f"row name {self.name!r} is not a plain folder name")
        if self.context_slices < 0:
            raise ModelError(f"row {self.name}: context_slices must be >= 0")
        if self.loss not in LOSSES:
            raise ModelError(f"row {self.name}: loss {self.loss!r} is not one of {LOSSES}")
        if self.edge_weight < 0:
            raise ModelError(f"row {self.name}: edge_weight must be >= 0")


@dataclass(frozen=True)
class Comparison:
    """A parsed comparison file."""

    base: Path
    rows: list[RowSpec]
    seeds: list[int]
    max_minutes: float | None = None

    @classmethod
    def from_file(cls, path: Path) -> Comparison:
        """Parse a comparison TOML (see the module docstring).

        Raises
        ------
        ModelError
            The file is missing or not TOML, a key is missing or invalid, row names repeat,
            or the base folder lacks ``train.toml`` / ``model.toml``.
        """
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"no comparison file {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ModelError(f"{path}: not valid TOML: {exc}") from exc
        try:
            base = (path.parent / raw["base"]).resolve()
            rows = [RowSpec(**row) for row in raw["rows"]]
            seeds = [int(seed) for seed in raw.get("seeds", [0])]
        except KeyError as exc:
            raise ModelError(f"{path}: missing key {exc}") from exc
        except TypeError as exc:
            raise ModelError(f"{path}: {exc}") from exc
        names = [row.name for row in rows]
        if len(set(names)) != len(names):
            raise ModelError(f"{path}: row names repeat: {names}")
        if not seeds:
            raise ModelError(f"{path}: seeds is empty")
        for name in (TRAIN_FILE, CARD_FILE):
            if not (base / name).is_file():
                raise ModelError(f"{path}: base folder {base} has no {name}")
        max_minutes = raw.get("max_minutes")
        return cls(
            base=base,
            rows=rows,
            seeds=seeds,
            max_minutes=None if max_minutes is None else float(max_minutes),
        )


def _dump_toml(document: Mapping[str, Any]) -> str:
    """Top-level scalars, then one ``[table]`` per mapping, ``[[array]]`` per list of tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in document.items() if not _is_table(v)]
    for key, value in document.items():
        if isinstance(value, Mapping):
            lines += ["", f"[{key}]", *(f"{k} = {toml_value(v)}" for k, v in value.items())]
        elif _is_table(value):
            for item in value:
                lines += ["", f"[[{key}]]", *(f"{k} = {toml_value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)
    )


def _row_params(row: RowSpec) -> dict[str, Any]:
    params = {"in_channels": 2 * row.context_slices + 1, **row.params}
    if params["in_channels"] != 2 * row.context_slices + 1:
        raise ModelError(
            f"row {row.name}: in_channels {params['in_channels']} does not match "
            f"context_slices {row.context_slices}"
        )
    return params


def prepare_run(base: Path, row: RowSpec, run_dir: Path) -> None:
    """Write ``run_dir/train.toml`` and ``run_dir/model.toml`` for ``row`` from ``base``.

    The card keeps the base's labels, input and series rules; its variants, metrics,
    verification and runtime choice are dropped (they describe the base's own files).
    """
    with (base / TRAIN_FILE).open("rb") as handle:
        recipe = tomllib.load(handle)
    with (base / CARD_FILE).open("rb") as handle:
        card = tomllib.load(handle)
    params = _row_params(row)
    recipe["network"] = {"architecture": row.architecture, "params": params}
    recipe.setdefault("input", {})["context_slices"] = row.context_slices
    recipe["train"] = {
        **recipe.get("train", {}),
        "loss": row.loss,
        "edge_weight": row.edge_weight,
        **row.train,
    }
    for section in _CARD_SECTIONS_DROPPED:
        card.pop(section, None)
    card["name"] = f"{card.get('name', 'model')}-{row.name}"
    card["weights"] = {
        **card.get("weights", {}),
        "format": "state_dict",
        "file": "weights.pt",
        "architecture": row.architecture,
        "params": params,
    }
    card.setdefault("input", {})["context_slices"] = row.context_slices
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TRAIN_FILE).write_text(_dump_toml(recipe))
    (run_dir / CARD_FILE).write_text(_dump_toml(card))
    TrainConfig.from_file(run_dir / TRAIN_FILE)  # fail now, not after training


def flops_per_slice(net: torch.nn.Module, in_channels: int, side: int) -> float:
    """FLOPs of one forward pass on a (1, in_channels, side, side) input (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    net.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(torch.zeros(1, in_channels, side, side))
    return float(counter.get_total_flops())


def _blocks(slices: Sequence[int]) -> Iterator[list[int]]:
    block: list[int] = []
    for index in slices:
        if block and index != block[-1] + 1:
            yield block
            block = []
        block.append(index)
    if block:
        yield block


@torch.inference_mode()
def evaluate_heldout_a(run_dir: Path, data_dir: Path) -> dict[str, float]:
    """Dice and HD95 (mm) per label on the training subject's held-out blocks (MONAI metrics).

    Dice is pooled over all held-out slices (``DiceMetric`` on one stacked volume); HD95 is
    computed per contiguous block (a block is a small 3-D volume; stacking blocks that are
    not neighbours would invent surfaces) and averaged over the blocks that hold the label.
    """
    from monai.metrics.hausdorff_distance import HausdorffDistanceMetric
    from monai.metrics.meandice import DiceMetric

    config = TrainConfig.from_file(run_dir / TRAIN_FILE)
    subject = load_subject(data_dir, config)
    _, val_slices = split_slices(subject.image.shape[0], config.val_block, config.val_every)
    net = build_network(config.architecture, config.params)
    net.load_state_dict(torch.load(run_dir / "weights.pt", weights_only=True))
    net.eval()
    stacked = stack_context(subject.image, config.context_slices)
    prediction = np.zeros_like(subject.target)
    for start in range(0, len(val_slices), 16):
        picks = val_slices[start : start + 16]
        prediction[picks] = net(torch.from_numpy(stacked[picks])).argmax(dim=1).numpy()
    classes = config.num_classes

    def onehot(labels: np.ndarray[Any, Any]) -> torch.Tensor:
        # (z, y, x) -> (1, classes, z, y, x), MONAI's channel-first batch.
        tensor = torch.from_numpy(labels.astype(np.int64))
        return torch.nn.functional.one_hot(tensor, classes).permute(3, 0, 1, 2)[None].float()

    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    scores: Any = dice(onehot(prediction[val_slices]), onehot(subject.target[val_slices]))
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    per_block: list[list[float]] = [[] for _ in range(classes - 1)]
    for block in _blocks(val_slices):
        with warnings.catch_warnings():
            # An empty class gives inf/nan, handled below; MONAI 1.6's metric itself passes a
            # deprecated argument to its own helper (FutureWarning).
            warnings.filterwarnings("ignore", "the (ground truth|prediction) of class")
            warnings.filterwarnings("ignore", ".*always_return_as_numpy", FutureWarning)
            distances: Any = hd95(
                onehot(prediction[block]),
                onehot(subject.target[block]),
                spacing=subject.spacing_zyx,
            )
        for index in range(classes - 1):
            value = float(distances[0, index])
            if not math.isnan(value) and (subject.target[block] == index + 1).any():
                per_block[index].append(value)
    out: dict[str, float] = {}
    for index, name in enumerate(config.labels):
        out[f"dice_{name}"] = float(scores[0, index])
        out[f"hd95_mm_{name}"] = (
            float(np.mean(per_block[index])) if per_block[index] else float("nan")
        )
    out["slices"] = float(len(val_slices))
    return out


def run_one(
    comparison: Comparison,
    row: RowSpec,
    seed: int,
    run_dir: Path,
    data_dir: Path,
    *,
    heldout_subject: str = "ct-abdomen-b",
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Train ``row`` with ``seed`` into ``run_dir``, evaluate it, write ``result.json``.

    Returns
    -------
    dict
        What ``result.json`` holds: the row, the seed, training figures, ``heldout_b`` and
        ``heldout_a`` scores, parameters, FLOPs and CPU time per 200-slice study, and the
        machine it ran on.
    """
    from scp_node.inference.predictor import Predictor
    from scp_node.training.evaluate import evaluate_series
    from scp_node.training.train import train

    prepare_run(comparison.base, row, run_dir)
    result = train(
        run_dir,
        data_dir,
        seed=seed,
        max_minutes=comparison.max_minutes,
        progress=False,
        device=device,
    )
    config = TrainConfig.from_file(run_dir / TRAIN_FILE)
    subject_dir = data_dir / heldout_subject
    heldout_b = evaluate_series(
        run_dir,
        subject_dir / "dicom",
        subject_dir / "labels.nii.gz",
        variant="fp32",
        predictor=Predictor(device="cpu"),
    )
    heldout_a = evaluate_heldout_a(run_dir, data_dir)
    net = build_network(config.architecture, config.params)
    side = round(512 * 0.977 / config.spacing_mm[0])
    record: dict[str, Any] = {
        "row": asdict(row),
        "seed": seed,
        "train": {
            "minutes": result.minutes,
            "val_dice": result.val_dice,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "stopped": result.stopped,
            "device": device,
            "threads": threads if threads is not None else torch.get_num_threads(),
            "max_minutes": comparison.max_minutes,
        },
        "heldout_b": heldout_b,
        "heldout_a": heldout_a,
        "parameters": sum(p.numel() for p in net.parameters()),
        "gflops_per_study": STUDY_SLICES
        * flops_per_slice(net, config.params["in_channels"], side)
        / 1e9,
        "ms_per_200_slice_study": STUDY_SLICES * heldout_b["ms_per_slice"],
        "machine": _machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    partial = run_dir / (RESULT_FILE + ".part")
    partial.write_text(json.dumps(record, indent=2, allow_nan=True))
    os.replace(partial, run_dir / RESULT_FILE)
    return record


def _machine() -> dict[str, Any]:
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_vnni", "amx_tile")
                flags = [flag for flag in line.split(":", 1)[1].split() if flag in wanted]
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "load_average": list(os.getloadavg()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def compare(
    comparison: Comparison,
    out_dir: Path,
    data_dir: Path,
    *,
    resume: bool = False,
    rows: Sequence[str] | None = None,
    device: str = "cpu",
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train and evaluate every (row, seed) not yet saved; return all saved results.

    Parameters
    ----------
    comparison
        The parsed comparison file.
    out_dir
        ``<out>/<row>/seed-<seed>/`` per run.
    data_dir
        The shared data folder.
    resume
        Keep runs whose ``result.json`` exists (same row definition) and train the rest;
        without it an existing result is an error, so nothing is overwritten by accident.
    rows
        Only these row names (others' saved results still appear in the returned list).
    device
        Training device (``"cpu"``, ``"cuda"``, ``"auto"``); evaluation is on the CPU.
    on_run
        Called with each new run's record as soon as it is saved (progress reports).

    Raises
    ------
    ModelError
        A run already has a result and ``resume`` is off, a saved result belongs to a
        different row definition, or ``rows`` names an unknown row.
    """
    known = {row.name for row in comparison.rows}
    unknown = sorted(set(rows or []) - known)
    if unknown:
        raise ModelError(f"unknown rows {unknown} (known: {sorted(known)})")
    for row in comparison.rows:
        if rows and row.name not in rows:
            continue
        for seed in comparison.seeds:
            run_dir = out_dir / row.name / f"seed-{seed}"
            saved = run_dir / RESULT_FILE
            if saved.exists():
                if not resume:
                    raise ModelError(f"{saved} exists: pass --resume to keep it, or another --out")
                if json.loads(saved.read_text())["row"] != asdict(row):
                    raise ModelError(f"{saved} was trained from another definition of {row.name}")
                logger.info("kept %s seed %d (saved)", row.name, seed)
                continue
            logger.info("training %s seed %d into %s", row.name, seed, run_dir)
            record = run_one(comparison, row, seed, run_dir, data_dir, device=device)
            if on_run is not None:
                on_run(record)
    return load_results(out_dir, comparison)


def load_results(out_dir: Path, comparison: Comparison) -> list[dict[str, Any]]:
    """The saved ``result.json`` of the comparison's rows that match their definition."""
    results = []
    for row in comparison.rows:
        for path in sorted((out_dir / row.name).glob(f"seed-*/{RESULT_FILE}")):
            record = json.loads(path.read_text())
            if record["row"] == asdict(row):
                results.append(record)
    return results


def _spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    mean = statistics.fmean(finite)
    text = f"{mean:.3f}" if abs(mean) < 10 else f"{mean:.1f}"
    if len(finite) > 1:
        sd = statistics.stdev(finite)
        text += f" ± {sd:.3f}" if abs(mean) < 10 else f" ± {sd:.1f}"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)} not finite)"
    return text


def summarise(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table: per row, mean ± sample SD over its seeds.

    Columns: seeds, Dice and HD95 per label on B (worker path) and on A's held-out blocks,
    training minutes, parameters, GFLOPs per 200-slice study, CPU ms per 200-slice study.
    """
    by_row: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        by_row.setdefault(record["row"]["name"], []).append(record)
    labels: list[str] = []
    for record in results:
        for key in record["heldout_b"]:
            if key.startswith("dice_") and key[5:] not in labels:
                labels.append(key[5:])
    header = ["row", "seeds"]
    for label in labels:
        header += [
            f"B Dice {label}",
            f"B HD95 {label} (mm)",
            f"A Dice {label}",
            f"A HD95 {label} (mm)",
        ]
    header += ["train min", "params", "GFLOPs/study", "CPU ms/study"]
    table = []
    for name, records in by_row.items():
        line = [name, ",".join(str(r["seed"]) for r in records)]
        for label in labels:
            for subject, metric in (
                ("heldout_b", "dice"),
                ("heldout_b", "hd95_mm"),
                ("heldout_a", "dice"),
                ("heldout_a", "hd95_mm"),
            ):
                line.append(
                    _spread([float(r[subject].get(f"{metric}_{label}", "nan")) for r in records])
                )
        line.append(_spread([r["train"]["minutes"] for r in records]))
        line.append(f"{records[0]['parameters']:,}")
        line.append(f"{records[0]['gflops_per_study']:.0f}")
        line.append(_spread([r["ms_per_200_slice_study"] for r in records]))
        table.append(line)
    return header, table
