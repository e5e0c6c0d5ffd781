"""Static int8 post-training quantisation (CPU) and ONNX export of a slice network.

Two paths, both calibrated on whole training slices at the model's spacing:

* **torch FX** (``torch.ao.quantization``): ``prepare_fx`` with the engine's default
  qconfig, calibration, ``convert_fx``, then traced and frozen to a TorchScript file that
  loads without the Python model code (``format = "torchscript"``, ``quantized_engine``).
* **ONNX Runtime QDQ**: the fp32 graph exported to ONNX with dynamic batch/height/width,
  then ``onnxruntime.quantization.quantize_static`` (QDQ format, int8 per-channel weights
  with ``reduce_range``, uint8 activations) (``format = "onnx"``). Without
  ``reduce_range`` ONNX Runtime's u8s8 kernels on CPUs without AVX-512 VNNI (AVX2 only)
  add pairs of u8 x s8 products in 16 bits, which saturates: the shipped model's Dice
  against its fp32 network fell to 0.68 on such a machine. 7-bit weights keep the pairs in
  range there and cost nothing measurable on VNNI machines.

``torch.quantization.quantize_dynamic`` is not offered: it quantises linear and recurrent
layers only, so a conv net gains nothing from it. Transposed convolutions are not used by
our networks (torch FX int8 computes them wrongly). Every variant must be gated on Dice
against fp32 (:mod:`scp_node.training.evaluate`), never on speed alone.

The exported graphs take input padded to the network's ``size_multiple`` (the card's
``pad_multiple``): they contain no shape-dependent control flow.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.preprocess import stack_context
from scp_node.training.data import TrainConfig, load_subject, split_slices

__all__ = [
    "Padded",
    "calibration_batches",
    "export_onnx",
    "quantize_fx",
    "quantize_onnx",
]


class Padded(nn.Module):
    """The traceable core of a network: ``net.forward_padded`` (input already padded)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if not hasattr(net, "forward_padded"):
            raise ModelError(f"{type(net).__name__} has no forward_padded(): cannot export it")
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_padded(x)  # type: ignore[no-any-return, operator]


def size_multiple(net: nn.Module) -> int:
    """The multiple input height/width must have for ``net.forward_padded``."""
    return int(getattr(net, "size_multiple", 1))


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # torch 2.13 marks its FX quantisation, TorchScript tracing and the TorchScript-based
    # ONNX exporter as deprecated, and the tracer warns about the constant shape
    # arithmetic of the quantised graph; they are the documented working paths for
    # static int8 of conv nets in this torch release (the newer exporter needs onnxscript,
    # not a dependency). The numerical gate is the Dice comparison, not these warnings.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*might cause the trace to be incorrect.*")
        warnings.filterwarnings("ignore", message=r".*quant_min and quant_max.*")
        warnings.filterwarnings("ignore", message=r".*torch\.quantize_per_tensor.*")
        yield


def calibration_batches(
    data_dir: Path,
    config: TrainConfig,
    *,
    multiple: int,
    slices: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Whole training slices of the training subject as calibration input.

    Parameters
    ----------
    data_dir
        The shared data folder (``<subject>/<image>``).
    config
        The model's training configuration (subject, window, spacing, context).
    multiple
        Height and width are zero-padded to a multiple of this.
    slices
        How many training slices (evenly spread, seeded); validation blocks excluded.
    batch_size
        Slices per returned batch.
    seed
        Seed for the choice of slices.

    Returns
    -------
    list of torch.Tensor
        (batch, 2 * context + 1, rows, columns) float32 batches.
    """
    subject = load_subject(data_dir, config)
    train_slices, _ = split_slices(subject.image.shape[0], config.val_block, config.val_every)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(train_slices, size=min(slices, len(train_slices)), replace=False))
    stacked = torch.from_numpy(stack_context(subject.image, config.context_slices)[chosen])
    pad_h = (-stacked.shape[-2]) % multiple
    pad_w = (-stacked.shape[-1]) % multiple
    stacked = F.pad(stacked, (0, pad_w, 0, pad_h))
    return list(torch.split(stacked, batch_size))


def quantize_fx(
    net: nn.Module, calibration: Sequence[torch.Tensor], path: Path, *, engine: str = "x86"
) -> torch.jit.ScriptModule:
    """Static int8 of ``net`` with torch FX, saved as a frozen TorchScript file.

    Parameters
    ----------
    net
        fp32 network with ``forward_padded`` (left unchanged).
    calibration
        Input batches (padded) the observers see.
    path
        Where the TorchScript file is written.
    engine
        Quantized engine (``"x86"``, ``"onednn"``, ``"fbgemm"``, ``"qnnpack"``); the
        same one must be selected when the file is loaded (the card's
        ``quantized_engine``).

    Returns
    -------
    torch.jit.ScriptModule
        The quantised module (also written to ``path``).

    Raises
    ------
    ModelError
        The engine is not in this torch build, or no calibration batch is given.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if engine not in torch.backends.quantized.supported_engines:
        raise ModelError(f"quantized engine {engine!r} not available in this torch build")
    if not calibration:
        raise ModelError("no calibration batches")
    torch.backends.quantized.engine = engine
    core = Padded(_cpu_copy(net)).eval()
    example = calibration[0][:1]
    with _quiet_export():
        prepared = prepare_fx(core, get_default_qconfig_mapping(engine), example_inputs=(example,))
        with torch.inference_mode():
            for batch in calibration:
                prepared(batch)
        converted = convert_fx(prepared)
        with torch.inference_mode():
            traced: Any = torch.jit.trace(converted, example)  # type: ignore[no-untyped-call]
            frozen: torch.jit.ScriptModule = torch.jit.freeze(traced.eval())
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(frozen, str(path))
    return frozen


def export_onnx(net: nn.Module, path: Path, example: torch.Tensor, *, opset: int = 17) -> None:
    """Export ``net.forward_padded`` to ONNX with dynamic batch, height and width.

    Parameters
    ----------
    net
        fp32 network with ``forward_padded`` (left unchanged, eval mode used).
    path
        The ``.onnx`` file to write (input ``input``, output ``logits``).
    example
        A (1, C, H, W) padded input for tracing.
    opset
        ONNX opset.
    """
    core = Padded(_cpu_copy(net)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {0: "batch", 2: "height", 3: "width"}
    with _quiet_export():
        torch.onnx.export(
            core,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": axes, "logits": axes},
            opset_version=opset,
            dynamo=False,
        )


def quantize_onnx(
    fp32_path: Path,
    path: Path,
    calibration: Sequence[torch.Tensor],
    *,
    per_channel: bool = True,
    reduce_range: bool = True,
    activations: str = "u8",
    op_types: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """Static int8 QDQ quantisation of an fp32 ONNX graph with ONNX Runtime.

    Measured on the shipped pruned network, 2-core AMD EPYC with AVX2 and no VNNI, against
    the pruned fp32 network on its reference case: u8 activations / s8 weights, full range:
    liver Dice 0.68 (saturation); the same with ``reduce_range``: 0.998 and the fastest
    int8 ONNX graph there (25 ms/slice vs 28 for fp32 ONNX Runtime, a noisy machine);
    QOperator format with ``reduce_range``: 0.998 but 2x slower; u8 weights: 0.998, slower;
    s8 symmetric activations: Dice 0 (wrong), so not the default.

    Parameters
    ----------
    fp32_path
        The fp32 graph (from :func:`export_onnx`).
    path
        The int8 graph to write.
    calibration
        Input batches for the MinMax calibration of activations.
    per_channel
        Per-output-channel weight scales (more accurate for convs).
    reduce_range
        7-bit weights: correct on CPUs without VNNI (see above).
    activations
        ``"u8"`` (asymmetric uint8) or ``"s8"`` (symmetric int8, s8s8 kernels).
    op_types
        Operator types to quantise; ``None``: every type ONNX Runtime can.
    exclude
        Node names left in fp32.

    Raises
    ------
    ModelError
        No calibration batch, or ``activations`` is neither ``u8`` nor ``s8``.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ModelError("no calibration batches")
    if activations not in ("u8", "s8"):
        raise ModelError(f"activations must be u8 or s8, got {activations!r}")
    symmetric = activations == "s8"

    import onnxruntime as ort

    graph_input = (
        ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        .get_inputs()[0]
        .name
    )

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._all = [{graph_input: b.numpy()} for b in calibration]
            self._batches = iter(self._all)

        def __len__(self) -> int:
            return len(self._all)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._batches = iter(self._all[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    prepared = path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(path),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            reduce_range=reduce_range,
            op_types_to_quantize=list(op_types) if op_types is not None else None,
            nodes_to_exclude=list(exclude),
            # One batch per collection, ranges merged after each: ONNX Runtime otherwise
            # keeps every intermediate output of every batch (8 GB for four 3-D patches).
            extra_options={"ActivationSymmetric": symmetric, "CalibStridedMinMax": 1},
        )
    finally:
        prepared.unlink(missing_ok=True)


def _cpu_copy(net: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(net).cpu().eval()
