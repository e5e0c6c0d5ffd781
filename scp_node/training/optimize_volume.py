"""``scp-node model optimize`` for volume cards (nnU-Net v2 folders and MONAI bundles):
exported and int8 variants of the 3-D network, kept only if the whole-volume result agrees
with fp32.

Steps: the network (an nnU-Net fold's, or a bundle's ``network_def`` or ``models/model.ts``)
is exported to ONNX with a fixed patch shape, the plans' patch size or the bundle inferer's
``roi_size`` (:func:`export_volume_onnx`, opset :data:`OPSET`); ONNX Runtime's static
quantiser writes
an int8 QDQ copy calibrated on patches of real studies (``--calibration``, a folder of
DICOM series, prepared exactly as the runtime prepares them), with per-channel weights and
``reduce_range`` so that ONNX Runtime's u8s8 kernels are correct on CPUs without VNNI.
Each file becomes a variant per engine (ONNX Runtime, and OpenVINO when installed: it runs
the same QDQ file with its own int8 kernels). The **agreement gate** segments held-out
studies with each candidate and with the fp32 torch runtime, sliding window, resampling and
argmax included, and keeps a candidate only when every label's Dice (pooled over the
studies) is >= ``min_dice``. Kept variants are recorded in the card in the order of their
measured speed with ``[runtime] cpu = "auto"``, and a reference patch is stored for
start-up verification (:mod:`scp_node.inference.verify_volume`).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scp_node.dicom.volume import load_volume
from scp_node.errors import ModelError
from scp_node.inference.registry import CARD_FILE, ModelSpec, WeightsSpec
from scp_node.inference.runtime.geometry import AXIAL, reorientation
from scp_node.inference.runtime.onnx import ENGINES, Engine, openvino_available
from scp_node.inference.runtime.volume import VolumeModel, VolumePredictor
from scp_node.inference.runtime.window import window_starts
from scp_node.inference.verify import REFERENCE_FILE, label_dice
from scp_node.inference.verify_volume import VolumeReference, network_logits
from scp_node.training.optimize import series_files
from scp_node.training.quantize import quantize_onnx
from scp_node.training.variants import replace_table, write_variant

__all__ = [
    "INT8_OPS",
    "OPSET",
    "VolumeGate",
    "VolumeOptimization",
    "calibration_patches",
    "conv_nodes",
    "export_volume_onnx",
    "optimize_volume_model",
]

logger = logging.getLogger(__name__)

#: ONNX opset of exported 3-D networks: InstanceNormalization and per-channel QDQ
#: (opset >= 13) are read by both ONNX Runtime 1.32 and OpenVINO 2026.4's ONNX frontend.
OPSET = 17
#: Engine -> suffix of the variant names (``int8-ort``, ``fp32-ov``, ...).
_ENGINE_SUFFIX: dict[Engine, str] = {"ort": "ort", "openvino": "ov"}

#: Operators quantised: the convolutions. InstanceNorm stays fp32 (its statistics are
#: per patch: int8 inputs to it moved the fixture's labels most), and so do the first
#: convolution (raw intensities in) and the last (logits out): measured on the test
#: fixture, worst-label Dice vs fp32 0.58 with every operator quantised, 0.77 like this.
INT8_OPS = ("Conv", "ConvTranspose")

Study = tuple[npt.NDArray[np.float32], tuple[float, float, float]]


@dataclass(frozen=True)
class VolumeGate:
    """The agreement gate's verdict on one candidate variant."""

    variant: str
    #: Label name -> Dice of the candidate's whole-volume labels against fp32's, pooled.
    dice: dict[str, float]
    min_dice: float
    studies: int
    kept: bool
    #: Seconds the candidate took for the held-out studies (fp32 torch: ``fp32_s``).
    seconds: float
    file: str
    engine: Engine
    precision: str

    def describe(self, fp32_s: float) -> str:
        """One line: kept or refused, every label's Dice, and the speed against fp32."""
        verdict = "kept" if self.kept else "refused"
        labels = ", ".join(f"{n} {d:.4f}" for n, d in self.dice.items())
        return (
            f"variant {self.variant} {verdict}: Dice vs fp32 on {self.studies} held-out "
            f"studies: {labels} (gate >= {self.min_dice:.2f}); {self.seconds:.1f} s vs fp32 "
            f"{fp32_s:.1f} s ({fp32_s / max(self.seconds, 1e-9):.2f}x)"
        )


@dataclass(frozen=True)
class VolumeOptimization:
    """What :func:`optimize_volume_model` did."""

    gates: tuple[VolumeGate, ...]
    #: fp32 torch runtime's seconds on the held-out studies.
    fp32_s: float
    calibration_patches: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kept(self) -> tuple[str, ...]:
        """Kept variants, fastest first."""
        ok = sorted((g for g in self.gates if g.kept), key=lambda g: g.seconds)
        return tuple(g.variant for g in ok)

    def describe(self) -> str:
        """Lines for the console: one per candidate, then the notes."""
        lines = [g.describe(self.fp32_s) for g in self.gates]
        return "\n".join([*lines, *self.notes])


def export_volume_onnx(network: nn.Module, path: Path, patch_size: tuple[int, int, int]) -> None:
    """Write ``network`` as an ONNX graph taking (1, 1, *patch_size) float32.

    The shape is fixed: the sliding window only ever feeds whole patches, and a static
    shape lets both engines plan memory and choose kernels once.

    Raises
    ------
    ModelError
        The exporter fails (the message names the file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros((1, 1, *patch_size), dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter (the one that needs no onnxscript) is deprecated in
            # torch 2.13 and warns that InstanceNorm is exported in training mode (it
            # normalises per instance either way); the graph is gated on Dice after.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network.eval(),
                (example,),
                str(path),
                input_names=["input"],
                output_names=["logits"],
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        if isinstance(network, torch.jit.ScriptModule):
            raise ModelError(
                f"cannot export the network to {path}: torch.onnx cannot export this "
                f"TorchScript module ({exc}); give the weights as a state dict with the "
                "network's definition instead (a MONAI bundle's models/model.pt and "
                "network_def)"
            ) from exc
        raise ModelError(f"cannot export the network to {path}: {exc}") from exc


def dicom_studies(folder: Path) -> list[Study]:
    """(volume, spacing) of every DICOM series under ``folder`` (see :func:`series_files`)."""
    out = []
    for paths in series_files(folder):
        volume = load_volume(paths)
        out.append((np.asarray(volume.array, dtype=np.float32), volume.spacing_zyx))
    return out


def _prepared(model: VolumeModel, study: Study) -> npt.NDArray[np.float32]:
    """The network-space data of a study, as :class:`VolumePredictor` prepares it."""
    volume, spacing = study
    turn = reorientation(AXIAL, model.orientation)
    return model.prepare(turn.apply(volume), turn.spacing(spacing)).data


def calibration_patches(
    model: VolumeModel, studies: Sequence[Study], count: int
) -> list[torch.Tensor]:
    """``count`` sliding-window patches (1, 1, *patch), evenly spread over the windows the
    runtime would run on ``studies`` (zero-padded as it pads).

    Raises
    ------
    ModelError
        ``count`` < 1.
    """
    if count < 1:
        raise ModelError(f"calibration patches must be >= 1, got {count}")
    patch = model.patch_size
    windows: list[torch.Tensor] = []
    for study in studies:
        data = _prepared(model, study)[:1]
        shape = [max(s, p) for s, p in zip(data.shape[1:], patch, strict=True)]
        padded = np.zeros((1, *shape), dtype=np.float32)
        before = [(s - d) // 2 for s, d in zip(shape, data.shape[1:], strict=True)]
        inner = tuple(slice(b, b + d) for b, d in zip(before, data.shape[1:], strict=True))
        padded[(slice(None), *inner)] = data
        starts = [
            window_starts(s, p, model.tile_step_size) for s, p in zip(shape, patch, strict=True)
        ]
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    window = padded[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]]
                    windows.append(torch.from_numpy(window.copy())[None])
    pick = np.unique(np.linspace(0, len(windows) - 1, min(count, len(windows))).astype(int))
    return [windows[i] for i in pick]


def _split(calibration: Path, holdout: Path | None) -> tuple[list[Study], list[Study], str | None]:
    """Calibration and held-out studies, and a note when they come from one series."""
    studies = dicom_studies(calibration)
    if holdout is not None:
        return studies, dicom_studies(holdout), None
    if len(studies) > 1:
        return studies[0::2], studies[1::2], None
    # One series: its lower half calibrates, its upper half (other anatomy) is held out.
    volume, spacing = studies[0]
    half = volume.shape[0] // 2
    last = volume.shape[0] - 1
    note = f"one calibration series: slices 0-{half - 1} calibrate, {half}-{last} are held out"
    return [(volume[:half], spacing)], [(volume[half:], spacing)], note


def _segment(runtime: VolumePredictor, studies: Sequence[Study]) -> tuple[list[np.ndarray], float]:
    started = time.perf_counter()
    labels = [runtime.predict(volume, spacing) for volume, spacing in studies]
    return labels, time.perf_counter() - started


def _pooled_dice(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], values: Sequence[int]
) -> list[float]:
    ref = np.concatenate([a.reshape(-1) for a in reference])
    new = np.concatenate([b.reshape(-1) for b in candidate])
    lut = np.zeros(max(values) + 1, dtype=np.int32)
    lut[list(values)] = np.arange(1, len(values) + 1)
    return label_dice(lut[ref], lut[new], len(values) + 1)


def optimize_volume_model(
    model_dir: Path,
    *,
    calibration: Path,
    holdout: Path | None = None,
    min_dice: float = 0.98,
    patches: int = 8,
    engines: Sequence[Engine] | None = None,
    threads: int = 0,
) -> VolumeOptimization:
    """Export, quantise and gate the network of a volume card; record the kept variants.

    Parameters
    ----------
    model_dir
        A ``format = "nnunetv2"`` model folder (one fold) or a ``format = "monai_bundle"``
        one whose inferer is a ``SlidingWindowInferer`` (its ``roi_size`` is the patch).
    calibration
        Folder of DICOM series; int8 activation ranges come from their patches.
    holdout
        Folder of DICOM series for the gate; ``None``: every other calibration series, or
        with a single series its upper half of slices (the lower half calibrates).
    min_dice
        The gate: every label's Dice against the fp32 runtime must reach it.
    patches
        Calibration patches (evenly spread over the calibration windows).
    engines
        Engines to make variants for; default ONNX Runtime, and OpenVINO when installed.
    threads
        Engine threads; 0 follows ``torch.get_num_threads()``.

    Returns
    -------
    VolumeOptimization
        Every candidate's verdict; the card changes only when one is kept.

    Raises
    ------
    ModelError
        The card is not a single-fold nnU-Net card nor a MONAI bundle with a ``roi_size``,
        an engine is unknown or not installed, the network cannot be exported (a
        TorchScript module torch.onnx cannot export), or there is no calibration or
        held-out data.
    """
    from scp_node.inference.runtime import load_runtime

    spec = ModelSpec.from_model_dir(model_dir)
    if spec.kind != "volume" or spec.format not in ("nnunetv2", "monai_bundle"):
        raise ModelError(f"{spec.name}: not a volume card of an nnU-Net folder or MONAI bundle")
    if spec.nnunet is not None and len(spec.nnunet.folds) != 1:
        raise ModelError(
            f"{spec.name}: optimize handles one fold, the card runs {spec.nnunet.folds}"
        )
    chosen: Sequence[Engine] = engines or (
        ("ort", "openvino") if openvino_available() else ("ort",)
    )
    for engine in chosen:
        if engine not in ENGINES:
            raise ModelError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
        if engine == "openvino" and not openvino_available():
            raise ModelError("engine openvino needs the openvino package (pip install openvino)")
    reference = load_runtime(spec, "cpu", threads)
    assert isinstance(reference, VolumePredictor)
    model = reference.model
    if min(model.patch_size) < 1:
        raise ModelError(
            f"{spec.name}: the bundle's inferer has no roi_size (not a SlidingWindowInferer): "
            "an exported network needs a fixed patch shape"
        )
    fp32_file, int8_file = "network-fp32.onnx", "network-int8.onnx"
    export_volume_onnx(model.networks[0], model_dir / fp32_file, model.patch_size)
    calibrate, held, note = _split(calibration, holdout)
    if not held:
        raise ModelError("no held-out study for the agreement gate")
    batches = calibration_patches(model, calibrate, patches)
    convs = conv_nodes(model_dir / fp32_file)
    quantize_onnx(
        model_dir / fp32_file,
        model_dir / int8_file,
        batches,
        reduce_range=True,
        op_types=INT8_OPS,
        exclude=convs[:1] + convs[-1:],
    )
    expected, fp32_s = _segment(reference, held)
    values = [label.value for label in spec.labels]
    gates: list[VolumeGate] = []
    for engine in chosen:
        for precision, file in (("fp32", fp32_file), ("int8", int8_file)):
            name = f"{precision}-{_ENGINE_SUFFIX[engine]}"
            weights = WeightsSpec(
                format="onnx", file=file, precision=precision, source="fp32", engine=engine
            )
            spec = write_variant(model_dir, name, weights)
            candidate = load_runtime(spec, "cpu", threads, variant=name)
            assert isinstance(candidate, VolumePredictor)
            labels, seconds = _segment(candidate, held)
            scores = _pooled_dice(expected, labels, values)
            dice = {label.name: round(s, 4) for label, s in zip(spec.labels, scores, strict=True)}
            kept = min(scores) >= min_dice
            gates.append(
                VolumeGate(name, dice, min_dice, len(held), kept, seconds, file, engine, precision)
            )
            logger.info("%s", gates[-1].describe(fp32_s))
    result = VolumeOptimization(
        tuple(gates), fp32_s, len(batches), (note,) if note is not None else ()
    )
    _record(model_dir, result, reference, held[0], min_dice)
    return result


def conv_nodes(path: Path) -> list[str]:
    """Names of the graph's convolution nodes, in graph order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [node.name for node in graph.node if node.op_type in INT8_OPS]


def _record(
    model_dir: Path,
    result: VolumeOptimization,
    reference: VolumePredictor,
    study: Study,
    min_dice: float,
) -> None:
    """Drop refused variants and unused files; order the kept ones; store the reference
    patch (the held-out window where fp32 finds the most foreground)."""
    card = model_dir / CARD_FILE
    text = card.read_text(encoding="utf-8")
    for gate in result.gates:
        if not gate.kept:
            text = _drop_table(text, f"variants.{gate.variant}")
    used = {g.file for g in result.gates if g.kept}
    for file in {g.file for g in result.gates} - used:
        (model_dir / file).unlink(missing_ok=True)
    if result.kept:
        body = {"cpu": "auto", "cpu_order": list(result.kept)}
        text = replace_table(text, "runtime", body)
        case = _reference_patch(reference, study)
        case.save(model_dir / REFERENCE_FILE)
        text = replace_table(text, "verify", {"file": REFERENCE_FILE, "min_dice": min_dice})
    card.write_text(text, encoding="utf-8")
    ModelSpec.from_model_dir(model_dir)  # the card must still read


def _drop_table(text: str, header: str) -> str:
    """``text`` without table ``[header]`` (and its keys)."""
    pattern = re.compile(rf"^\[{re.escape(header)}\][^\n]*\n(?:(?!\[)[^\n]*\n?)*", re.MULTILINE)
    return pattern.sub("", text).rstrip("\n") + "\n"


def _reference_patch(runtime: VolumePredictor, study: Study) -> VolumeReference:
    model = runtime.model
    candidates = calibration_patches(model, [study], 8)
    best: tuple[int, VolumeReference] | None = None
    for patch in candidates:
        inputs = patch.numpy()
        logits = network_logits(runtime, inputs).numpy()
        case = VolumeReference.from_logits(inputs, logits)
        foreground = int((case.labels > 0).sum())
        if best is None or foreground > best[0]:
            best = (foreground, case)
    assert best is not None
    return best[1]
