"""ONNX files run by ONNX Runtime or OpenVINO: the sessions both runtimes use, and exported
3-D networks behind the ``nn.Module`` call the volume runtime makes.

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
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.registry import ModelSpec

_Run = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]

__all__ = [
    "ENGINES",
    "Engine",
    "OnnxNetwork",
    "exported_networks",
    "openvino_available",
    "openvino_session",
    "ort_session",
]

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
        self._run = (
            openvino_session(path, threads)
            if engine == "openvino"
            else ort_session(path, threads)[0]
        )

    def run(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """(1, C, *patch) float32 -> (1, classes, *patch) float32 logits."""
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of windows, run one at a time (the graph's batch is fixed at 1)."""
        inputs = x.detach().float().cpu().numpy()
        outputs = [self.run(inputs[k : k + 1]) for k in range(inputs.shape[0])]
        return torch.from_numpy(np.concatenate(outputs))


def ort_session(path: Path, threads: int, *, cuda: bool = False) -> tuple[_Run, str]:
    """ONNX Runtime runs of ``path`` and the device they run on (``"cuda"`` or ``"cpu"``).

    ``cuda`` asks for ONNX Runtime's CUDA provider, used when it is installed.

    Raises
    ------
    ModelError
        onnxruntime is not installed, or it cannot load the file.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise ModelError("onnx weights need the onnxruntime package") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        raise ModelError(f"cannot load ONNX model {path}: {exc}") from exc
    name = session.get_inputs()[0].name
    device = "cuda" if session.get_providers()[0].startswith("CUDA") else "cpu"

    def run(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (logits, *_rest) = session.run(None, {name: x})
        return np.ascontiguousarray(logits, dtype=np.float32)

    return run, device


#: Input shapes an OpenVINO session keeps compiled at once.
OPENVINO_SHAPES = 4


def openvino_session(path: Path, threads: int, *, streams: int = 1) -> _Run:
    """OpenVINO CPU runs of ``path``, each compiled for a fixed input shape.

    A graph compiled for a fixed shape runs markedly faster than one with a dynamic batch
    or size (its int8 convolutions: 6.1 vs 10.0 ms of CPU per 176x176 slice on one thread
    of an AVX-512 VNNI EPYC). A study has one slice size and a constant batch, so a
    compile (about a second) is paid once per size; a smaller batch (a study's last) is
    zero-padded to the smallest compiled batch of its size rather than compiled again.
    The last :data:`OPENVINO_SHAPES` shapes stay compiled (a 3-D graph has one, its
    patch). fp32 precision hint: on CPUs with AVX-512 BF16 or AMX the plugin would
    otherwise run fp32 graphs in bf16, and every variant is verified against fp32.

    With ``streams`` > 1 the plugin runs that many streams (``threads`` shared among
    them) and each call splits its batch into up to ``streams`` equal parts, one infer
    request per part, run at once: on 2 cores, two single-thread streams of 4 slices
    spent about 10 % less CPU than one 2-thread request of 8 (small convolutions
    parallelise poorly inside one request). The compiled shape is then the part's.

    Raises
    ------
    ModelError
        openvino is not installed, or it cannot read the file (or, at the first run of a
        shape, compile it).
    """
    try:
        import openvino as ov
    except ImportError as exc:
        raise ModelError(
            f"{path}: engine 'openvino' needs the openvino package (pip install openvino)"
        ) from exc
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as exc:  # OpenVINO raises RuntimeError and its own classes
        raise ModelError(f"cannot read {path} with OpenVINO: {exc}") from exc
    streams = max(1, min(streams, threads))
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    if streams > 1:
        config["NUM_STREAMS"] = streams
    compiled: dict[tuple[int, ...], tuple[Any, list[Any]]] = {}

    def compile_for(shape: tuple[int, ...]) -> tuple[Any, list[Any]]:
        sized = model.clone()
        sized.reshape({0: list(shape)})
        try:
            network = core.compile_model(sized, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError and its own classes
            raise ModelError(f"cannot compile {path} with OpenVINO: {exc}") from exc
        requests = [network.create_infer_request() for _ in range(streams)]
        return network.outputs[0], requests

    def run(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        count, rest = x.shape[0], tuple(x.shape[1:])
        part = -(-count // streams)
        fits = [k for k in compiled if k[1:] == rest and k[0] >= part]
        key = min(fits) if fits else (part, *rest)
        entry = compiled.pop(key, None) or compile_for(key)
        compiled[key] = entry  # most recently used last
        while len(compiled) > OPENVINO_SHAPES:
            del compiled[next(iter(compiled))]
        output, requests = entry
        size = key[0]
        parts = [x[first : first + size] for first in range(0, count, size)]
        if len(parts[-1]) < size:
            last = parts[-1]
            parts[-1] = np.concatenate([last, np.zeros((size - len(last), *rest), x.dtype)])
        if len(parts) == 1:
            # The request reuses its output buffer on the next call: copy.
            return np.array(requests[0].infer({0: parts[0]})[output][:count], dtype=np.float32)
        running = requests[: len(parts)]
        for request, chunk in zip(running, parts, strict=True):
            request.start_async({0: chunk})
        for request in running:
            request.wait()
        outputs = np.concatenate([r.get_tensor(output).data for r in running])
        return np.asarray(outputs[:count], dtype=np.float32)

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
