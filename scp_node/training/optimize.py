"""``scp-node model optimize``: an int8 ONNX variant of any 2-D card (run by ONNX Runtime or
OpenVINO), kept only if it agrees with its fp32 network.

Sources: our own ``state_dict`` cards (exported with ``forward_padded``), bring-your-own
ONNX files (used as they are) and TorchScript files (exported to ONNX). Calibration uses real
studies (a folder of DICOM series, ``--calibration``) or, for our cards, the training
subject. The **agreement gate** runs the fp32 source and the int8 graph on held-out slices
(``--holdout``, or the odd slices of the calibration series when none is given: the even
ones calibrate) and keeps the variant only if every label's pooled Dice of the argmax is
>= ``min_dice``. A kept variant is recorded in the card (``source`` = the fp32 network, so
start-up verification compares with it) and, when the card has no reference case yet, one
is made from the held-out slices. nnU-Net folders (3-D) are optimised by
:mod:`scp_node.training.optimize_volume`; MONAI bundles are not handled yet.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scp_node.dicom.volume import load_volume
from scp_node.errors import ModelError
from scp_node.inference.predictor import OnnxModule, Predictor, model_input
from scp_node.inference.registry import REFERENCE_VARIANT, ModelSpec, WeightsSpec
from scp_node.inference.runtime.onnx import ENGINES
from scp_node.inference.verify import label_dice
from scp_node.training.data import TRAIN_FILE, TrainConfig
from scp_node.training.quantize import (
    calibration_batches,
    export_onnx,
    quantize_onnx,
    size_multiple,
)
from scp_node.training.reference import reference_from_inputs, write_reference
from scp_node.training.variants import load_network, write_variant

__all__ = ["GateResult", "agreement_dice", "dicom_inputs", "optimize_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    """The agreement gate's verdict on a new variant."""

    variant: str
    source: str
    #: Label name -> pooled Dice of the variant's argmax against the source's.
    dice: dict[str, float]
    min_dice: float
    slices: int
    kept: bool
    file: str

    def describe(self) -> str:
        """One line: kept or refused, with every label's Dice."""
        verdict = "kept" if self.kept else "refused"
        labels = ", ".join(f"{n} {d:.4f}" for n, d in self.dice.items())
        return (
            f"variant {self.variant} {verdict}: Dice vs {self.source} on {self.slices} "
            f"held-out slices: {labels} (gate >= {self.min_dice:.2f})"
        )


def series_files(folder: Path) -> list[list[Path]]:
    """The ``.dcm`` files under ``folder``, one list per directory (one series each).

    Raises
    ------
    ModelError
        No ``.dcm`` file under ``folder``.
    """
    groups: dict[Path, list[Path]] = {}
    for path in sorted(folder.rglob("*.dcm")):
        groups.setdefault(path.parent, []).append(path)
    if not groups:
        raise ModelError(f"no DICOM series (*.dcm) under {folder}")
    return list(groups.values())


def dicom_inputs(spec: ModelSpec, folder: Path) -> list[torch.Tensor]:
    """Model inputs of every DICOM series under ``folder`` (see :func:`series_files`)."""
    out = []
    for paths in series_files(folder):
        volume = load_volume(paths)
        out.append(model_input(spec, volume.array, volume.spacing_zyx))
    return out


def agreement_dice(
    reference: Predictor, candidate: Predictor, inputs: Sequence[torch.Tensor], classes: int
) -> list[float]:
    """Pooled per-label Dice (class 1..classes-1) of two predictors' argmax on ``inputs``."""
    pairs = []
    with torch.inference_mode():
        for volume in inputs:
            for batch in torch.split(volume, 8):
                pairs.append(
                    (
                        reference.logits(batch).argmax(dim=1).numpy(),
                        candidate.logits(batch).argmax(dim=1).numpy(),
                    )
                )
    ref = np.concatenate([a.reshape(-1) for a, _ in pairs])
    new = np.concatenate([b.reshape(-1) for _, b in pairs])
    return label_dice(ref, new, classes)


def _fp32_onnx(spec: ModelSpec, source: str, scratch: Path) -> tuple[Path, int]:
    """The fp32 graph of ``source`` as ONNX, and the multiple its input must be padded to."""
    weights = spec.variant(source)
    if weights.precision != "fp32":
        raise ModelError(f"{spec.name}: source {source!r} is {weights.precision}, not fp32")
    channels = 2 * spec.input.context_slices + 1
    if weights.format == "onnx":
        return spec.directory / weights.file, weights.pad_multiple
    if weights.format == "state_dict":
        net = load_network(spec, source)
        multiple = size_multiple(net)
        path = scratch / "fp32.onnx"
        export_onnx(net, path, torch.zeros(1, channels, 4 * multiple, 4 * multiple))
        return path, multiple
    multiple = weights.pad_multiple
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
        module = torch.jit.load(str(spec.directory / weights.file), map_location="cpu")  # type: ignore[no-untyped-call]
    size = max(4 * multiple, 32)
    path = scratch / "fp32.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in torch 2.13 and notes that a
            # ScriptModule has no Python signature; the graph it writes is then gated on
            # Dice like any other, so its warnings tell the operator nothing.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.zeros(1, channels, size, size),),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": axes, "logits": axes},
                opset_version=17,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ModelError(f"{spec.name}: cannot export {weights.file} to ONNX: {exc}") from exc
    return path, multiple


def _padded_batches(inputs: Sequence[torch.Tensor], multiple: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for volume in inputs:
        padded = F.pad(
            volume, (0, (-volume.shape[-1]) % multiple, 0, (-volume.shape[-2]) % multiple)
        )
        out.extend(torch.split(padded, 8))
    return out


def _spread(inputs: Sequence[torch.Tensor], slices: int) -> list[torch.Tensor]:
    """At most ``slices`` slices in all, evenly spread over the volumes."""
    total = sum(len(v) for v in inputs)
    step = max(1, total // max(1, slices))
    return [v[::step] for v in inputs if len(v[::step])]


def optimize_model(
    model_dir: Path,
    *,
    calibration: Path | None = None,
    holdout: Path | None = None,
    data_dir: Path | None = None,
    source: str = REFERENCE_VARIANT,
    name: str | None = None,
    min_dice: float = 0.98,
    slices: int = 32,
    engine: str = "ort",
) -> GateResult:
    """Build an int8 ONNX variant of ``source`` and keep it only if it agrees.

    Parameters
    ----------
    model_dir
        The model folder (card + weights).
    calibration
        Folder of DICOM series for the activation ranges; ``None``: the training subject
        of ``train.toml`` under ``data_dir`` (our cards only).
    holdout
        Folder of DICOM series for the gate; ``None``: the odd slices of the
        ``calibration`` series (the even ones calibrate).
    data_dir
        The shared data folder (``calibration=None`` only).
    source
        The fp32 variant quantised (``"fp32"`` = ``[weights]``).
    name
        Variant name; default ``<source>-int8-ort`` (``int8-ort`` for ``fp32``; ``-ov``
        for OpenVINO).
    min_dice
        The gate: every label's Dice against ``source`` must reach it.
    slices
        Calibration slices (evenly spread).
    engine
        ``"ort"`` or ``"openvino"``: the engine that runs the variant, in the gate as on
        the node. The int8 QDQ file is ONNX Runtime's quantiser's either way.

    Returns
    -------
    GateResult
        The verdict; the card and the file change only when ``kept``.

    Raises
    ------
    ModelError
        The source cannot be exported, no calibration or held-out data is available, or
        the card cannot be read.
    """
    spec = ModelSpec.from_model_dir(model_dir)
    stem = "" if source == REFERENCE_VARIANT else f"{source}-"
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    name = name or f"{stem}int8-{'ov' if engine == 'openvino' else 'ort'}"
    file = f"{name}.onnx"
    if calibration is not None:
        volumes = dicom_inputs(spec, calibration)
        if holdout is None:
            calibrate = [v[0::2] for v in volumes]
            held = [v[1::2] for v in volumes if len(v) > 1]
        else:
            calibrate, held = volumes, dicom_inputs(spec, holdout)
    else:
        if holdout is None or data_dir is None or not (model_dir / TRAIN_FILE).is_file():
            raise ModelError(
                "give --calibration (DICOM series), or for a card with train.toml both "
                "--data-dir and --holdout"
            )
        calibrate, held = [], dicom_inputs(spec, holdout)
    if not held:
        raise ModelError("no held-out slices for the agreement gate")
    with tempfile.TemporaryDirectory() as scratch:
        fp32_path, multiple = _fp32_onnx(spec, source, Path(scratch))
        if calibration is not None:
            batches = _padded_batches(_spread(calibrate, slices), multiple)
        else:
            assert data_dir is not None
            config = TrainConfig.from_file(model_dir / TRAIN_FILE)
            batches = calibration_batches(data_dir, config, multiple=multiple, slices=slices)
        quantize_onnx(fp32_path, model_dir / file, batches)
    reference = Predictor("cpu")
    reference.load(spec, source)
    candidate = Predictor("cpu")
    candidate.load_module(OnnxModule(model_dir / file, engine=engine), spec, pad_multiple=multiple)
    scores = agreement_dice(reference, candidate, held, len(spec.labels) + 1)
    dice = {label.name: round(s, 4) for label, s in zip(spec.labels, scores, strict=True)}
    kept = min(scores) >= min_dice
    result = GateResult(name, source, dice, min_dice, sum(len(v) for v in held), kept, file)
    if not kept:
        (model_dir / file).unlink(missing_ok=True)
        logger.warning("%s", result.describe())
        return result
    spec = write_variant(
        model_dir,
        name,
        WeightsSpec(
            format="onnx",
            file=file,
            pad_multiple=multiple,
            precision="int8",
            source=source,
            engine=engine,
        ),
    )
    if spec.verify.file is None:
        same_size = len({tuple(v.shape[1:]) for v in held}) == 1
        write_reference(
            model_dir, reference_from_inputs(spec, torch.cat(held) if same_size else held[0])
        )
    logger.info("%s", result.describe())
    return result
