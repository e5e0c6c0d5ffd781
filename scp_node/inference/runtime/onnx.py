"""Exported 3-D networks (ONNX files) behind the ``nn.Module`` call the volume runtime makes.

``scp-node model optimize`` writes a volume model's network as an ONNX graph with the fixed
patch shape of its plans (fp32, and int8 QDQ from ONNX Runtime's quantiser). Either file
runs in ONNX Runtime or in OpenVINO's CPU plugin (``engine``); the sliding window, fold
averaging and resampling stay those of :mod:`scp_node.inference.runtime.volume`, so only
the network's arithmetic differs from the fp32 torch path.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.registry import ModelSpec

_Run = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]

__all__ = ["ENGINES", "Engine", "OnnxNetwork", "exported_networks", "openvino_available"]

Engine = Literal["ort", "openvino"]
#: Engines an exported variant may name (``engine`` in the card's variant table).
ENGINES: tuple[Engine, ...] = ("ort", "openvino")


def openvino_available() -> bool:
    """Whether the ``openvino`` package is importable (it is optional)."""
    return importlib.util.find_spec("openvino") is not None


class OnnxNetwork(nn.Module):
    """One ONNX graph of fixed input shape (1, channels, z, y, x), run by ``engine``.

    Parameters
    ----------
    path
        The ``.onnx`` file: first input (1, C, *patch) float32, first output the logits
        (1, classes, *patch).
    engine
        ``"ort"`` (ONNX Runtime, CPU provider) or ``"openvino"`` (OpenVINO CPU plugin).
    threads
        Intra-op threads; 0 follows ``torch.get_num_threads()``.

    Raises
    ------
    ModelError
        The engine's package is not installed, or it cannot read or compile the file.
    """

    def __init__(self, path: Path, *, engine: Engine = "ort", threads: int = 0) -> None:
        super().__init__()
        if engine not in ENGINES:
            raise ModelError(f"{path}: unknown engine {engine!r} (known: {', '.join(ENGINES)})")
        self.path = path
        self.engine = engine
        threads = threads or torch.get_num_threads()
        self._run = _openvino(path, threads) if engine == "openvino" else _ort(path, threads)

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(1, C, *patch) float32 -> (1, classes, *patch) float32 logits."""
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of windows, run one at a time (the graph's batch is fixed at 1)."""
        inputs = x.detach().float().cpu().numpy()
        outputs = [self.run(inputs[k : k + 1]) for k in range(inputs.shape[0])]
        return torch.from_numpy(np.concatenate(outputs))


def _ort(path: Path, threads: int) -> _Run:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise ModelError("onnx variants need the onnxruntime package") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        raise ModelError(f"cannot load ONNX model {path}: {exc}") from exc
    name = session.get_inputs()[0].name

    def run(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = np.asarray(session.run(None, {name: x})[0], np.float32)
        return out

    return run


def _openvino(path: Path, threads: int) -> _Run:
    try:
        import openvino as ov
    except ImportError as exc:
        raise ModelError(
            f"{path}: engine 'openvino' needs the openvino package (pip install openvino)"
        ) from exc
    core = ov.Core()
    try:
        compiled = core.compile_model(
            core.read_model(str(path)),
            "CPU",
            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"},
        )
    except Exception as exc:  # OpenVINO raises RuntimeError and its own classes
        raise ModelError(f"cannot compile {path} with OpenVINO: {exc}") from exc
    request = compiled.create_infer_request()
    output = compiled.outputs[0]

    def run(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        result = request.infer({0: x})
        return np.array(result[output], dtype=np.float32)

    return run


def exported_networks(spec: ModelSpec, variant: str, threads: int = 0) -> tuple[nn.Module, ...]:
    """The networks of an exported (``format = "onnx"``) variant of a volume card.

    Raises
    ------
    ModelError
        The variant is not an ONNX file, or its engine cannot load it.
    """
    weights = spec.variant(variant)
    if weights.format != "onnx":
        raise ModelError(f"{spec.name}: variant {variant!r} is {weights.format}, not onnx")
    return (OnnxNetwork(spec.directory / weights.file, engine=weights.engine, threads=threads),)
