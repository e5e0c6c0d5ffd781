"""Model variants of a model folder: prune, quantise, export, and record them in the card.

Each step reads the card (``model.toml``), writes its weights file next to it and records
a ``[variants.<name>]`` table in the card, so :class:`~scp_node.inference.predictor.Predictor`
can load it by name and ``[runtime]`` can choose it per device. The card is edited as
text: only the variant's own table (or ``[runtime]``) is replaced, comments and the rest
stay as written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.nets import build_network
from scp_node.inference.registry import CARD_FILE, REFERENCE_VARIANT, ModelSpec, WeightsSpec
from scp_node.training.data import TRAIN_FILE, TrainConfig
from scp_node.training.prune import count_flops, prune_attention_unet
from scp_node.training.quantize import (
    calibration_batches,
    export_onnx,
    quantize_fx,
    quantize_onnx,
    size_multiple,
)
from scp_node.training.train import TrainResult, train

__all__ = [
    "PruneResult",
    "export_model",
    "load_network",
    "prune_model",
    "quantize_model",
    "replace_table",
    "set_runtime",
    "toml_value",
    "write_variant",
]

logger = logging.getLogger(__name__)


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (inline tables for mappings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def replace_table(text: str, header: str, body: dict[str, Any]) -> str:
    """``text`` with table ``[header]`` replaced (or appended) by ``body``."""
    block = f"[{header}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items())
    pattern = re.compile(rf"^\[{re.escape(header)}\][^\n]*\n(?:(?!\[)[^\n]*\n?)*", re.MULTILINE)
    if pattern.search(text):
        return pattern.sub(lambda _m: block + "\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + block


def write_variant(model_dir: Path, name: str, weights: WeightsSpec) -> ModelSpec:
    """Record variant ``name`` in ``model_dir/model.toml`` and return the re-read card.

    Raises
    ------
    ModelError
        ``name`` is reserved or not a bare TOML key, or the card becomes invalid.
    """
    if name == REFERENCE_VARIANT or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ModelError(f"bad variant name {name!r}")
    card = model_dir / CARD_FILE
    body = weights.model_dump(exclude_defaults=True)
    body.setdefault("format", weights.format)
    body.setdefault("file", weights.file)
    card.write_text(replace_table(card.read_text(), f"variants.{name}", body))
    return ModelSpec.from_model_dir(model_dir)


def set_runtime(model_dir: Path, *, cpu: str, cuda: str, cuda_autocast: str = "auto") -> ModelSpec:
    """Set the card's ``[runtime]`` (variant per device) and return the re-read card."""
    card = model_dir / CARD_FILE
    body: dict[str, Any] = {"cpu": cpu, "cuda": cuda, "cuda_autocast": cuda_autocast}
    order = ModelSpec.from_model_dir(model_dir).runtime.cpu_order
    if order:
        body["cpu_order"] = list(order)  # the fallback order stays as the card had it
    card.write_text(replace_table(card.read_text(), "runtime", body))
    return ModelSpec.from_model_dir(model_dir)


def load_network(spec: ModelSpec, variant: str = REFERENCE_VARIANT) -> nn.Module:
    """The torch module of a ``state_dict`` variant, on the CPU, in eval mode.

    Raises
    ------
    ModelError
        The variant is not a ``state_dict`` or its weights do not fit.
    """
    weights = spec.variant(variant)
    if weights.format != "state_dict" or weights.architecture is None:
        raise ModelError(f"{spec.name}: variant {variant!r} is not a state_dict variant")
    net = build_network(weights.architecture, dict(weights.params))
    state = torch.load(spec.directory / weights.file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{spec.name}: variant {variant!r}: {exc}") from exc
    return net.eval()


@dataclass(frozen=True)
class PruneResult:
    """A pruning run: channel widths and FLOPs before/after, and the fine-tuning."""

    widths_before: tuple[int, ...]
    widths_after: tuple[int, ...]
    flops_before: int
    flops_after: int
    fine_tune: TrainResult | None


def prune_model(
    model_dir: Path,
    data_dir: Path,
    *,
    ratio: float = 0.5,
    epochs: int = 15,
    lr_scale: float = 0.3,
    seed: int = 0,
    name: str = "pruned",
    progress: bool = True,
) -> PruneResult:
    """Structurally prune the fp32 network of ``model_dir`` and fine-tune it.

    The pruned network (``ratio`` of the channels of every level removed, see
    :func:`~scp_node.training.prune.prune_attention_unet`) is fine-tuned with the model's
    ``train.toml`` for ``epochs`` epochs at ``lr_scale`` x its learning rate (best
    validation Dice on the training subject kept), written as ``<name>.pt`` and
    recorded as variant ``name``.

    Raises
    ------
    ModelError
        The card, training config or architecture does not allow pruning.
    """
    spec = ModelSpec.from_model_dir(model_dir)
    config = TrainConfig.from_file(model_dir / TRAIN_FILE)
    net = load_network(spec)
    pruned = prune_attention_unet(net, ratio)
    size = _model_size(spec, config)
    flops_before = count_flops(net, *size)
    flops_after = count_flops(pruned, *size)
    result: TrainResult | None = None
    file = f"{name}.pt"
    if epochs > 0:
        result = train(
            model_dir,
            data_dir,
            seed=seed,
            progress=progress,
            network=pruned.train(),
            weights_file=file,
            epochs=epochs,
            lr=config.lr * lr_scale,
        )
    else:
        torch.save(pruned.state_dict(), model_dir / file)
    params = {
        "in_channels": pruned.in_channels,
        "num_classes": pruned.num_classes,
        "depth": pruned.depth,
        "widths": list(pruned.widths),
    }
    write_variant(
        model_dir,
        name,
        WeightsSpec(format="state_dict", file=file, architecture="attention_unet", params=params),
    )
    widths_before = tuple(int(w) for w in getattr(net, "widths", ()))
    return PruneResult(widths_before, pruned.widths, flops_before, flops_after, result)


def _model_size(spec: ModelSpec, config: TrainConfig) -> tuple[int, int]:
    """A typical slice at the model's spacing: 512 x 512 pixels of 0.8 mm (a 41 cm FOV)."""
    del config
    return (
        round(512 * 0.8 / spec.input.spacing_mm[0]),
        round(512 * 0.8 / spec.input.spacing_mm[1]),
    )


def quantize_model(
    model_dir: Path,
    data_dir: Path,
    *,
    source: str = "pruned",
    methods: tuple[str, ...] = ("fx", "ort"),
    engine: str = "x86",
    calibration_slices: int = 32,
    seed: int = 0,
) -> dict[str, str]:
    """Static int8 variants of the ``state_dict`` variant ``source``.

    Writes and records, per method: ``fx`` -> ``<source>-int8-fx.pt`` (TorchScript,
    ``quantized_engine = engine``); ``ort`` -> ``<source>.onnx`` (fp32 export, variant
    ``<source>-onnx``) and ``<source>-int8.onnx`` (QDQ, variant ``<source>-int8-ort``).
    Calibration uses whole training slices of the training subject.

    Returns
    -------
    dict
        Variant name -> file written.

    Raises
    ------
    ModelError
        Unknown method, source not a ``state_dict`` variant, or engine unavailable.
    """
    unknown = set(methods) - {"fx", "ort"}
    if unknown:
        raise ModelError(f"unknown quantisation methods {sorted(unknown)} (known: fx, ort)")
    spec = ModelSpec.from_model_dir(model_dir)
    config = TrainConfig.from_file(model_dir / TRAIN_FILE)
    net = load_network(spec, source)
    multiple = size_multiple(net)
    batches = calibration_batches(
        data_dir, config, multiple=multiple, slices=calibration_slices, seed=seed
    )
    stem = source if source != REFERENCE_VARIANT else "fp32"
    written: dict[str, str] = {}
    if "fx" in methods:
        file = f"{stem}-int8-fx.pt"
        quantize_fx(net, batches, model_dir / file, engine=engine)
        write_variant(
            model_dir,
            f"{stem}-int8-fx",
            WeightsSpec(
                format="torchscript",
                file=file,
                pad_multiple=multiple,
                quantized_engine=engine,
                precision="int8",
                source=source,
            ),
        )
        written[f"{stem}-int8-fx"] = file
    if "ort" in methods:
        fp32_file, int8_file = f"{stem}.onnx", f"{stem}-int8.onnx"
        export_onnx(net, model_dir / fp32_file, batches[0][:1])
        write_variant(
            model_dir,
            f"{stem}-onnx",
            WeightsSpec(format="onnx", file=fp32_file, pad_multiple=multiple, source=source),
        )
        quantize_onnx(model_dir / fp32_file, model_dir / int8_file, batches)
        write_variant(
            model_dir,
            f"{stem}-int8-ort",
            WeightsSpec(
                format="onnx",
                file=int8_file,
                pad_multiple=multiple,
                precision="int8",
                source=source,
            ),
        )
        written[f"{stem}-onnx"] = fp32_file
        written[f"{stem}-int8-ort"] = int8_file
    return written


def export_model(
    model_dir: Path, variant: str, fmt: str, out_dir: Path, *, height: int = 64, width: int = 64
) -> Path:
    """Export a ``state_dict`` variant as a self-contained TorchScript or ONNX file.

    The file runs without this package's network code, in another model folder (a
    bring-your-own model needs only it and a card). The exported graph takes input padded
    to the network's ``size_multiple``; the card must say so with ``pad_multiple``.

    Parameters
    ----------
    model_dir
        The source model folder.
    variant
        A ``state_dict`` variant (``"fp32"`` for ``[weights]``).
    fmt
        ``"torchscript"`` or ``"onnx"``.
    out_dir
        Folder to write ``<variant>.pt`` / ``<variant>.onnx`` into.
    height, width
        Example input size for tracing (any multiple of the padding).

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    ModelError
        Unknown format or a variant that is not a ``state_dict``.
    """
    from scp_node.training.quantize import Padded, _quiet_export

    spec = ModelSpec.from_model_dir(model_dir)
    net = load_network(spec, variant)
    multiple = size_multiple(net)
    example = torch.zeros(
        1,
        int(getattr(net, "in_channels", 1)),
        height + (-height) % multiple,
        width + (-width) % multiple,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        path = out_dir / f"{variant}.onnx"
        export_onnx(net, path, example)
    elif fmt == "torchscript":
        path = out_dir / f"{variant}.pt"
        with _quiet_export(), torch.inference_mode():
            traced: Any = torch.jit.trace(Padded(net).eval(), example)  # type: ignore[no-untyped-call]
            torch.jit.save(traced, str(path))
    else:
        raise ModelError(f"export format must be torchscript or onnx, got {fmt!r}")
    return path
