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
import re
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
from scp_node.training.volume import VOLUME_KINDS, VolumeRecipe, coded_labels

__all__ = [
    "Comparison",
    "OrganVerdict",
    "RowSpec",
    "compare",
    "flops_per_slice",
    "load_results",
    "retime",
    "ship_rule",
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
    architecture: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    context_slices: int = 0
    loss: str = "dice+wce"
    edge_weight: float = 0.0
    train: dict[str, Any] = field(default_factory=dict)
    #: ``slice`` (a 2-D / 2.5-D network of :mod:`scp_node.inference.nets`, the slice
    #: runtime), or a 3-D row run by the volume runtime: ``nnunet3d`` (an nnU-Net v2
    #: folder) or ``hybrid`` (2-D features + 3-D head); see :mod:`scp_node.training.volume`.
    kind: str = "slice"
    #: Output classes (in order) -> value in the ``total`` label map; empty: the base's.
    labels: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ModelError(f"row name {self.name!r} is not a plain folder name")
        if self.kind not in ("slice", *VOLUME_KINDS):
            raise ModelError(
                f"row {self.name}: kind {self.kind!r} is not one of {('slice', *VOLUME_KINDS)}"
            )
        if self.kind == "slice" and not self.architecture:
            raise ModelError(f"row {self.name}: a slice row needs an architecture")
        if self.kind != "slice" and (self.context_slices or self.edge_weight):
            raise ModelError(
                f"row {self.name}: context_slices and edge_weight are for slice rows only"
            )
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
    #: The shipping rule: an organ ships only where every seed of a row reaches this Dice
    #: on held-out subject B, with at least ``ship_min_seeds`` seeds.
    ship_min_dice: float = 0.85
    ship_min_seeds: int = 3
    #: Time each 3-D run on a 200-slice study (tens of seconds on a CPU); off in smoke tests.
    time_studies: bool = True

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
            ship_min_dice=float(raw.get("ship_min_dice", 0.85)),
            ship_min_seeds=int(raw.get("ship_min_seeds", 3)),
            time_studies=bool(raw.get("time_studies", True)),
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
    if row.labels:
        params.setdefault("num_classes", len(row.labels) + 1)
        if params["num_classes"] != len(row.labels) + 1:
            raise ModelError(
                f"row {row.name}: num_classes {params['num_classes']} does not match "
                f"{len(row.labels)} labels + background"
            )
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
    if row.labels:
        recipe["labels"] = dict(row.labels)
        card["labels"] = coded_labels(list(row.labels))
        _describe_organs(card, row)
        weights = recipe["train"].get("ce_class_weights") if "train" in recipe else None
        if weights and len(weights) != len(row.labels) + 1 and "ce_class_weights" not in row.train:
            # The base's weights are for its own classes: background 1, each organ 2.
            recipe["train"]["ce_class_weights"] = [1.0] + [2.0] * len(row.labels)
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


def _describe_organs(card: dict[str, Any], row: RowSpec) -> None:
    """Say in the row's card which organs it segments, not the base's (a spleen-only row of
    a liver card must not call itself a liver model)."""
    organs = ", ".join(name.replace("_", " ") for name in row.labels)
    card["description"] = (
        f"{organs[:1].upper()}{organs[1:]} segmentation: row {row.name} of a model comparison "
        f"based on {card.get('name', 'a model')}."
    )
    provenance = card.get("provenance")
    if isinstance(provenance, dict) and isinstance(provenance.get("labels"), str):
        values = ", ".join(f"{name} = {value}" for name, value in row.labels.items())
        text, count = re.subn(
            r"\(map '([^']+)', [^)]*\)", rf"(map '\1', {values})", provenance["labels"]
        )
        provenance["labels"] = text if count else f"{text} ({values})"


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
    return score_heldout(
        prediction, subject.target, val_slices, subject.spacing_zyx, list(config.labels)
    )


@torch.inference_mode()
def evaluate_heldout_a_volume(
    run_dir: Path, data_dir: Path, labels: Mapping[str, int], subject: str = "ct-abdomen-a"
) -> dict[str, float]:
    """As :func:`evaluate_heldout_a` for a 3-D row: the volume runtime on the whole subject.

    Subject A goes in as the worker hands a study over (int16 HU, axial DICOM pixel order);
    only its held-out blocks (the 2-D rows' validation slices, masked out of the 3-D rows'
    loss) are scored.
    """
    from scp_node.inference.registry import ModelSpec
    from scp_node.inference.runtime import load_runtime
    from scp_node.inference.runtime.volume import VolumePredictor
    from scp_node.training.data import load_nifti_zyx

    image, spacing = load_nifti_zyx(data_dir / subject / "ct.nii.gz")
    source, _ = load_nifti_zyx(data_dir / subject / "labels.nii.gz")
    target = np.zeros(source.shape, dtype=np.uint8)
    for index, value in enumerate(labels.values(), start=1):
        target[source == value] = index
    runtime = load_runtime(ModelSpec.from_model_dir(run_dir), "cpu")
    assert isinstance(runtime, VolumePredictor)  # a volume card
    prediction = runtime.predict(np.rint(image).astype(np.int16), spacing)
    _, val_slices = split_slices(int(source.shape[0]), 5, 5)
    return score_heldout(prediction, target, val_slices, spacing, list(labels))


def score_heldout(
    prediction: np.ndarray[Any, Any],
    target: np.ndarray[Any, Any],
    val_slices: list[int],
    spacing_zyx: tuple[float, float, float],
    names: list[str],
) -> dict[str, float]:
    """``dice_<name>``, ``hd95_mm_<name>`` (MONAI) and ``slices`` on ``val_slices``.

    ``prediction`` and ``target`` are (z, y, x) class indices (1 for ``names[0]``, ...).
    """
    from monai.metrics.hausdorff_distance import HausdorffDistanceMetric
    from monai.metrics.meandice import DiceMetric

    classes = len(names) + 1

    def onehot(labels: np.ndarray[Any, Any]) -> torch.Tensor:
        # (z, y, x) -> (1, classes, z, y, x), MONAI's channel-first batch.
        tensor = torch.from_numpy(labels.astype(np.int64))
        return torch.nn.functional.one_hot(tensor, classes).permute(3, 0, 1, 2)[None].float()

    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    scores: Any = dice(onehot(prediction[val_slices]), onehot(target[val_slices]))
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    per_block: list[list[float]] = [[] for _ in range(classes - 1)]
    for block in _blocks(val_slices):
        with warnings.catch_warnings():
            # An empty class gives inf/nan, handled below; MONAI 1.6's metric itself passes a
            # deprecated argument to its own helper (FutureWarning).
            warnings.filterwarnings("ignore", "the (ground truth|prediction) of class")
            warnings.filterwarnings("ignore", ".*always_return_as_numpy", FutureWarning)
            distances: Any = hd95(
                onehot(prediction[block]), onehot(target[block]), spacing=spacing_zyx
            )
        for index in range(classes - 1):
            value = float(distances[0, index])
            if not math.isnan(value) and (target[block] == index + 1).any():
                per_block[index].append(value)
    out: dict[str, float] = {}
    for index, name in enumerate(names):
        out[f"dice_{name}"] = float(scores[0, index])
        out[f"hd95_mm_{name}"] = (
            float(np.mean(per_block[index])) if per_block[index] else float("nan")
        )
        out[f"reference_voxels_{name}"] = float((target[val_slices] == index + 1).sum())
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

    if row.kind != "slice":
        volume = _run_volume(comparison, row, seed, run_dir, data_dir, heldout_subject, device)
        volume["train"]["threads"] = threads if threads is not None else torch.get_num_threads()
        return _save_record(run_dir, volume)
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
    return _save_record(run_dir, record)


def _save_record(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    partial = run_dir / (RESULT_FILE + ".part")
    partial.write_text(json.dumps(record, indent=2, allow_nan=True))
    os.replace(partial, run_dir / RESULT_FILE)
    return record


def volume_recipe(comparison: Comparison, row: RowSpec) -> VolumeRecipe:
    """The 3-D training recipe of ``row``: its labels (else the base's), params, ``train``.

    Raises
    ------
    ModelError
        A ``train`` key is not a :class:`VolumeRecipe` field, or a value is invalid.
    """
    labels = dict(row.labels) or TrainConfig.from_file(comparison.base / TRAIN_FILE).labels
    train: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in row.train.items()
    }
    try:
        return VolumeRecipe(
            kind=row.kind, labels=labels, params=dict(row.params), loss=row.loss, **train
        )
    except TypeError as exc:
        raise ModelError(f"row {row.name}: {exc}") from exc


def _run_volume(
    comparison: Comparison,
    row: RowSpec,
    seed: int,
    run_dir: Path,
    data_dir: Path,
    heldout_subject: str,
    device: str,
) -> dict[str, Any]:
    from scp_node.inference.registry import ModelSpec
    from scp_node.training.evaluate import evaluate_series
    from scp_node.training.volume import train_volume_row

    recipe = volume_recipe(comparison, row)
    result = train_volume_row(
        run_dir,
        data_dir,
        recipe,
        name=f"compare-{row.name}",
        seed=seed,
        max_minutes=comparison.max_minutes,
        device=device,
    )
    subject_dir = data_dir / heldout_subject
    heldout_b = evaluate_series(
        run_dir,
        subject_dir / "dicom",
        subject_dir / "labels.nii.gz",
        variant="fp32",
        reference_values=recipe.labels,
    )
    heldout_a = evaluate_heldout_a_volume(run_dir, data_dir, recipe.labels, recipe.subject)
    spec = ModelSpec.from_model_dir(run_dir)
    return {
        "row": asdict(row),
        "seed": seed,
        "train": {
            "minutes": result.minutes,
            "steps": result.steps,
            "last_loss": result.last_loss,
            "stopped": result.stopped,
            "device": device,
            "max_minutes": comparison.max_minutes,
        },
        "heldout_b": heldout_b,
        "heldout_a": heldout_a,
        "parameters": result.parameters,
        "gflops_per_study": volume_gflops_per_study(spec),
        "ms_per_200_slice_study": (
            time_volume_study(spec) if comparison.time_studies else float("nan")
        ),
        "machine": _machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


#: The study the per-study figures are for: 200 slices of 512 x 512, 0.98 mm pixels,
#: 2 mm apart (subject B's geometry, ten times as long).
STUDY_SHAPE = (STUDY_SLICES, 512, 512)
STUDY_SPACING = (2.0, 0.977, 0.977)


def volume_gflops_per_study(spec: Any) -> float:
    """FLOPs of a volume card's network on the study: one window's FLOPs x the windows the
    runtime's sliding window (tile step 0.5, nnU-Net's placement) puts on it at the card's
    spacing."""
    from torch.utils.flop_counter import FlopCounterMode

    from scp_node.inference.runtime import load_runtime
    from scp_node.inference.runtime.volume import VolumePredictor
    from scp_node.inference.runtime.window import window_starts

    runtime = load_runtime(spec, "cpu")
    assert isinstance(runtime, VolumePredictor)
    model = runtime.model
    patch = model.patch_size
    if spec.format == "nnunetv2":
        assert spec.nnunet is not None  # complete_card fills it
        plans = json.loads((spec.weights_path / "plans.json").read_text())
        spacing = tuple(plans["configurations"][spec.nnunet.configuration]["spacing"])
    else:
        spacing = tuple(spec.volume.spacing_mm)
    grid = [
        max(p, round(n * s / t))
        for n, s, t, p in zip(STUDY_SHAPE, STUDY_SPACING, spacing, patch, strict=True)
    ]
    windows = math.prod(
        len(window_starts(n, p, model.tile_step_size)) for n, p in zip(grid, patch, strict=True)
    )
    counter = FlopCounterMode(display=False)
    network = model.networks[0]
    with torch.inference_mode(), counter:
        network(torch.zeros(1, 1, *patch))
    return windows * float(counter.get_total_flops()) / 1e9


def _time_predict(
    predict: Callable[..., Any],
    shape: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
) -> float:
    """Wall ms of ``predict(study, spacing_zyx)`` on the study the per-study times are taken
    on: int16 as the worker hands CT over, soft tissue (40 HU) inside a 64-pixel margin of
    0, so cropping has a body to keep."""
    study: np.ndarray[Any, Any] = np.zeros(shape, dtype=np.int16)
    study[:, 64:-64, 64:-64] = 40
    started = time.perf_counter()
    predict(study, spacing_zyx)
    return 1000 * (time.perf_counter() - started)


def time_volume_study(
    spec: Any,
    shape: tuple[int, int, int] = STUDY_SHAPE,
    spacing_zyx: tuple[float, float, float] = STUDY_SPACING,
) -> float:
    """CPU ms of the volume runtime on one study of ``shape`` (int16, as the worker hands it).

    A 20-slice series is mostly padding for a 3-D window, so a 3-D row's study time is
    measured on a study of that length rather than extrapolated from subject B.
    """
    from scp_node.inference.runtime import load_runtime
    from scp_node.inference.runtime.volume import VolumePredictor

    runtime = load_runtime(spec, "cpu")
    assert isinstance(runtime, VolumePredictor)  # a volume card
    return _time_predict(runtime.predict, shape, spacing_zyx)


def time_slice_study(
    spec: Any,
    shape: tuple[int, int, int] = STUDY_SHAPE,
    spacing_zyx: tuple[float, float, float] = STUDY_SPACING,
) -> float:
    """Wall ms of a slice card's fp32 ``Predictor.predict`` on one study of ``shape``.

    The same synthetic study as :func:`time_volume_study`, so 2-D and 3-D rows are timed on
    one footing.
    """
    from scp_node.inference.predictor import Predictor

    predictor = Predictor(device="cpu")
    predictor.load(spec, "fp32")
    return _time_predict(predictor.predict, shape, spacing_zyx)


def retime(
    comparison: Comparison,
    out_dir: Path,
    *,
    rows: Sequence[str] | None = None,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Time every saved run's fp32 network again on a 200-slice study; save and return all.

    A run's ``ms_per_200_slice_study`` was taken right after its training, under whatever
    else the machine ran then (the table's rows were trained side by side). Run this on a
    quiet machine to give every row the same conditions: each run's study time is replaced
    (the record keeps the threads, machine and load of the new timing under ``timing``).
    """
    from scp_node.inference.registry import ModelSpec

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for row, path, record in _saved_runs(out_dir, comparison):
            if rows and row.name not in rows:
                continue
            spec = ModelSpec.from_model_dir(path.parent)
            timer = time_slice_study if row.kind == "slice" else time_volume_study
            record["ms_per_200_slice_study"] = timer(spec)
            record["timing"] = {"threads": threads, "machine": _machine()}
            _save_record(path.parent, record)
            logger.info("retimed %s seed %s", row.name, record["seed"])
    finally:
        torch.set_num_threads(previous)
    return load_results(out_dir, comparison)


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
                if not _same_row(json.loads(saved.read_text())["row"], row):
                    raise ModelError(f"{saved} was trained from another definition of {row.name}")
                logger.info("kept %s seed %d (saved)", row.name, seed)
                continue
            logger.info("training %s seed %d into %s", row.name, seed, run_dir)
            record = run_one(comparison, row, seed, run_dir, data_dir, device=device)
            if on_run is not None:
                on_run(record)
    return load_results(out_dir, comparison)


def _same_row(saved: Mapping[str, Any], row: RowSpec) -> bool:
    """Whether a saved row definition is ``row`` (keys added since default to their value)."""
    try:
        return RowSpec(**saved) == row
    except (TypeError, ModelError):
        return False


def _saved_runs(
    out_dir: Path, comparison: Comparison
) -> Iterator[tuple[RowSpec, Path, dict[str, Any]]]:
    """Each saved run of the comparison's rows that matches its row's definition: the row,
    its ``result.json`` and what that holds."""
    for row in comparison.rows:
        for path in sorted((out_dir / row.name).glob(f"seed-*/{RESULT_FILE}")):
            record = json.loads(path.read_text())
            if _same_row(record["row"], row):
                yield row, path, record


def load_results(out_dir: Path, comparison: Comparison) -> list[dict[str, Any]]:
    """The saved ``result.json`` of the comparison's rows that match their definition."""
    return [record for _, _, record in _saved_runs(out_dir, comparison)]


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


@dataclass(frozen=True)
class OrganVerdict:
    """The shipping rule for one organ of one row."""

    row: str
    label: str
    seeds: int
    mean_dice: float
    min_dice: float
    #: Reference voxels of the organ on held-out subject B (0: B cannot judge it).
    reference_voxels: float
    qualifies: bool
    why: str


def ship_rule(results: list[dict[str, Any]], comparison: Comparison) -> list[OrganVerdict]:
    """Which organs of which rows may ship: every seed's held-out B Dice >= the threshold.

    An organ absent from subject B's reference (no voxels) never qualifies: its Dice there
    is only agreement on emptiness. Fewer seeds than ``ship_min_seeds`` never qualify.
    """
    by_row: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        by_row.setdefault(record["row"]["name"], []).append(record)
    verdicts = []
    for name, records in by_row.items():
        labels = [key[5:] for key in records[0]["heldout_b"] if key.startswith("dice_")]
        for label in labels:
            dice = [float(r["heldout_b"][f"dice_{label}"]) for r in records]
            voxels = min(
                float(r["heldout_b"].get(f"reference_voxels_{label}", "nan")) for r in records
            )
            if not voxels > 0:
                qualifies, why = False, "absent from subject B's reference"
            elif len(records) < comparison.ship_min_seeds:
                qualifies, why = False, f"{len(records)} < {comparison.ship_min_seeds} seeds"
            elif min(dice) < comparison.ship_min_dice:
                qualifies, why = False, f"a seed below {comparison.ship_min_dice}"
            else:
                qualifies, why = True, f"every seed >= {comparison.ship_min_dice}"
            verdicts.append(
                OrganVerdict(
                    row=name,
                    label=label,
                    seeds=len(records),
                    mean_dice=statistics.fmean(dice),
                    min_dice=min(dice),
                    reference_voxels=voxels,
                    qualifies=qualifies,
                    why=why,
                )
            )
    return verdicts
