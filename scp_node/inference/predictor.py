"""Predictor: a model card's network applied slice by slice to a volume.

Arrays in, arrays out: the caller (the worker) builds the volume from DICOM and turns the
label map into a SEG. Layered like nnU-Net's predictor: runtime settings in the
constructor, weights loaded after (:meth:`Predictor.load` from a model folder,
:meth:`Predictor.load_module` from a ready module), then :meth:`Predictor.predict`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.device import torch_device
from scp_node.inference.nets import build_network
from scp_node.inference.preprocess import resample_inplane, resampled_shape
from scp_node.inference.registry import ModelSpec
from scp_node.inference.runtime.onnx import openvino_session, ort_session

__all__ = [
    "OnnxModule",
    "Predictor",
    "autocast_dtype",
    "class_argmax",
    "labels_from_logits",
    "model_input",
]

logger = logging.getLogger(__name__)

#: The stages :attr:`Predictor.stage_s` times.
STAGES = ("prepare", "resample_in", "network", "labels")


class Predictor:
    """Runs a segmentation model on (slices, rows, columns) volumes.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:<n>"``.
    batch_size
        Slices per forward pass.
    threads
        When > 0, ``torch.set_num_threads(threads)`` (process-wide) for CPU inference.

    Raises
    ------
    ValueError
        ``device`` names no known device kind, CUDA is asked for but unavailable, or
        ``batch_size`` < 1.
    """

    def __init__(self, device: str = "auto", batch_size: int = 8, threads: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._device = torch_device(device, threads)
        self.batch_size = batch_size
        self._module: nn.Module | None = None
        self._spec: ModelSpec | None = None
        self._pad_multiple = 1
        self._variant = ""
        #: Seconds spent per stage of :meth:`predict` since construction (``prepare``:
        #: windowing and 2.5-D stacking; ``resample_in``: to the model spacing;
        #: ``network``; ``labels``: logits -> label map at the native size, label values).
        self.stage_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``: the device kind in use now (CPU after a CUDA OOM)."""
        return self._device.type

    @property
    def spec(self) -> ModelSpec:
        """The card of the loaded model.

        Raises
        ------
        ModelError
            Nothing is loaded yet.
        """
        if self._spec is None:
            raise ModelError("no model loaded: call load() or load_module() first")
        return self._spec

    @property
    def variant(self) -> str:
        """Name of the loaded variant (``"fp32"`` is the card's ``[weights]``)."""
        return self._variant

    def load(self, spec: ModelSpec, variant: str | None = None) -> None:
        """Load the weights named by ``spec`` onto this predictor's device, in eval mode.

        ``state_dict`` weights are loaded into the card's architecture built with its
        params; ``torchscript`` files with :func:`torch.jit.load` (int8 files after
        selecting their ``quantized_engine``); ``onnx`` files into an ONNX Runtime
        session (CUDA provider when on CUDA and installed, else the CPU, which then
        becomes this predictor's device) or, with ``engine = "openvino"``, OpenVINO's CPU
        plugin.

        Parameters
        ----------
        spec
            The model card.
        variant
            ``"fp32"`` (the ``[weights]`` table), a key of the card's ``[variants]``, or
            ``None``: the card's ``[runtime]`` choice for this predictor's device (int8 on
            the CPU, fp32 + autocast on CUDA for the shipped model).

        Raises
        ------
        ModelError
            Unknown variant, the file cannot be read, the weights do not fit the
            architecture, or a quantized engine is not available in this torch build.
        """
        name = variant if variant is not None else spec.variant_for(self._device.type)
        weights = spec.variant(name)
        path = spec.directory / weights.file
        fmt = weights.format
        try:
            if fmt == "state_dict":
                assert weights.architecture is not None  # the card validates this
                module = build_network(weights.architecture, dict(weights.params))
                state = torch.load(path, map_location=self._device, weights_only=True)
                if isinstance(state, dict) and "state_dict" in state:
                    state = state["state_dict"]
                module.load_state_dict(state)
            elif fmt == "torchscript":
                if weights.quantized_engine is not None:
                    _select_quantized_engine(weights.quantized_engine, spec.name)
                    if self._device.type != "cpu":
                        raise ModelError(
                            f"{spec.name}: variant {name!r} is int8 for the CPU; "
                            f"cannot run on {self._device.type}"
                        )
                with warnings.catch_warnings():
                    # torch 2.13 deprecates TorchScript in favour of torch.export, but
                    # TorchScript files are a supported model format of the card (int8
                    # FX variants and bring-your-own models) and still load correctly.
                    warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
                    module = torch.jit.load(  # type: ignore[no-untyped-call]
                        str(path), map_location=self._device
                    )
            else:
                module = OnnxModule(path, cuda=self._device.type == "cuda", engine=weights.engine)
                if module.device_type != self._device.type:
                    self._device = torch.device(module.device_type)
        except ModelError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{spec.name}: cannot load weights {path}: {exc}") from exc
        self.load_module(module, spec, pad_multiple=weights.pad_multiple)
        self._variant = name
        logger.info(
            "loaded model %s %s variant %s (%s) on %s",
            spec.name,
            spec.version,
            name,
            fmt,
            self.device,
        )

    def load_module(self, module: nn.Module, spec: ModelSpec, pad_multiple: int = 1) -> None:
        """Use a ready ``module`` with ``spec``'s input contract and labels.

        The module must map (batch, 2 * context_slices + 1, rows, columns) float32 to
        (batch, len(spec.labels) + 1, rows, columns) logits; with ``pad_multiple`` > 1
        rows and columns are zero-padded to a multiple of it first.
        """
        self._module = module.to(self._device).eval()
        self._spec = spec
        self._pad_multiple = pad_multiple
        self._variant = "module"

    def predict(
        self,
        volume: npt.NDArray[np.number],
        spacing_zyx: tuple[float, float, float],
        direction: npt.NDArray[np.float64] | None = None,
    ) -> npt.NDArray[np.unsignedinteger]:
        """Segment a volume.

        Works batch by batch: each batch of slices is normalised, stacked with its 2.5-D
        context and resampled to the model spacing on its own, and its labels are written
        straight into the one preallocated label map, so memory beyond ``volume`` and the
        result stays at a few batches of slices whatever the number of slices.

        Parameters
        ----------
        volume
            (slices, rows, columns) in modality units (HU for CT, rescale applied), in the
            DICOM pixel order of an axial series: axis 2 (columns) towards patient Left,
            axis 1 (rows) towards Posterior, axis 0 along the slice normal (increasing
            index = Superior for orientation [1,0,0,0,1,0]). Any float or integer dtype
            (the loader gives int16 when the rescale is exact in it).
        spacing_zyx
            Slice distance, row spacing and column spacing in mm (DICOM PixelSpacing is
            (row, column)). Only the in-plane spacings are used: slices are processed
            one by one and the 2.5-D context takes neighbours by index.
        direction
            Patient directions of the array axes (as the volume runtime takes them); not
            used: a slice model runs on the stored planes, and its card's series rules
            decide which orientations reach it.

        Returns
        -------
        numpy.ndarray
            Label map of ``volume``'s shape, uint8 (uint16 when a label value exceeds
            255); 0 is background, other values are the card's ``LabelSpec.value``.

        Raises
        ------
        ModelError
            No model loaded.
        ValueError
            ``volume`` is not 3-D or a spacing is not positive.
        """
        spec = self.spec
        if volume.ndim != 3:
            raise ValueError(f"volume must be (slices, rows, columns), got shape {volume.shape}")
        if min(spacing_zyx[1:]) <= 0:
            raise ValueError(f"in-plane spacing must be > 0, got {spacing_zyx}")
        started = time.perf_counter()
        values = [label.value for label in spec.labels]
        lut: npt.NDArray[np.unsignedinteger] = np.asarray(
            [0, *values], dtype=np.uint8 if max(values) <= 255 else np.uint16
        )
        native = (int(volume.shape[1]), int(volume.shape[2]))
        model_size = resampled_shape(
            native, (float(spacing_zyx[1]), float(spacing_zyx[2])), spec.input.spacing_mm
        )
        intensity = _Intensity.of(volume, spec)
        labels = np.empty(volume.shape, dtype=lut.dtype)
        self.stage_s["prepare"] += time.perf_counter() - started
        try:
            self._run(volume, intensity, model_size, lut, labels)
        except torch.OutOfMemoryError:
            if self._device.type != "cuda":
                raise
            logger.warning("CUDA out of memory: falling back to the CPU for this model")
            assert self._module is not None
            self._device = torch.device("cpu")
            self._module = self._module.to(self._device)
            torch.cuda.empty_cache()
            self._run(volume, intensity, model_size, lut, labels)
        elapsed = time.perf_counter() - started
        logger.info(
            "predicted %s on %d slices %dx%d in %.2f s (%.1f ms/slice, %s)",
            spec.name,
            volume.shape[0],
            native[0],
            native[1],
            elapsed,
            1000 * elapsed / max(1, volume.shape[0]),
            self.device,
        )
        return labels

    def _run(
        self,
        volume: npt.NDArray[np.number],
        intensity: _Intensity,
        model_size: tuple[int, int],
        lut: npt.NDArray[np.unsignedinteger],
        labels: npt.NDArray[np.unsignedinteger],
    ) -> None:
        """Fill ``labels`` batch by batch from ``volume`` (same shape).

        An ONNX network on the CPU (ONNX Runtime or OpenVINO: their runs release the GIL
        and use their own threads) runs in a helper thread, one batch ahead: while it
        computes batch k, this thread writes the labels of batch k - 1 and prepares batch
        k + 1, so only the network's time remains on the wall clock. Torch networks run
        in this thread (their threads are the ones the preparation uses).
        """
        assert self._module is not None
        native = (int(volume.shape[1]), int(volume.shape[2]))
        context = self.spec.input.context_slices
        stage = self.stage_s
        overlap = isinstance(self._module, OnnxModule) and self._device.type == "cpu"
        # Float buffers reused by every batch: fresh batch-sized arrays would each be
        # page-faulted in again, which cost more than the windowing itself. Two when the
        # network runs ahead: the batch it reads is not the one being prepared.
        buffers = [
            np.empty((self.batch_size, 2 * context + 1, *native), dtype=np.float32)
            for _ in range(2 if overlap else 1)
        ]
        pending: deque[tuple[int, int, Future[torch.Tensor]]] = deque()

        def finish() -> None:
            first, last, future = pending.popleft()
            began = time.perf_counter()
            logits = future.result()
            done = time.perf_counter()
            _write_labels(logits, native, lut, labels[first:last])
            stage["network"] += done - began
            stage["labels"] += time.perf_counter() - done

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(self._autocast())
            network = (
                stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="network"))
                if overlap
                else None
            )
            for count, start in enumerate(range(0, volume.shape[0], self.batch_size)):
                stop = min(start + self.batch_size, volume.shape[0])
                began = time.perf_counter()
                buffer = buffers[count % len(buffers)]
                prepared = _prepare(volume, start, stop, context, intensity, buffer)
                prepared_at = time.perf_counter()
                batch = resample_inplane(
                    torch.from_numpy(prepared).to(self._device), model_size, antialias=True
                )
                resampled = time.perf_counter()
                stage["prepare"] += prepared_at - began
                stage["resample_in"] += resampled - prepared_at
                future: Future[torch.Tensor] = Future()
                if network is None:
                    future.set_result(self.logits(batch))
                else:
                    future = network.submit(self.logits, batch)
                stage["network"] += time.perf_counter() - resampled
                pending.append((start, stop, future))
                if len(pending) > 1 or network is None:
                    finish()
            while pending:
                finish()

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The network alone on a prepared batch (the innermost layer of :meth:`predict`).

        Parameters
        ----------
        batch
            (N, 2 * context_slices + 1, rows, columns) float32 on :attr:`device`, already
            normalised and at the model's spacing; padded here to the variant's
            ``pad_multiple`` and cropped back.

        Returns
        -------
        torch.Tensor
            (N, classes, rows, columns) float32 logits.

        Raises
        ------
        ModelError
            No model loaded.
        """
        if self._module is None:
            raise ModelError("no model loaded: call load() or load_module() first")
        rows, columns = int(batch.shape[-2]), int(batch.shape[-1])
        pad_h = (-rows) % self._pad_multiple
        pad_w = (-columns) % self._pad_multiple
        if pad_h or pad_w:
            batch = F.pad(batch, (0, pad_w, 0, pad_h))
        return self._module(batch).float()[..., :rows, :columns]  # type: ignore[no-any-return]

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The CUDA autocast dtype :meth:`predict` uses, ``None`` for none (CPU, ONNX, int8,
        or the card's ``runtime.cuda_autocast = "none"``)."""
        if self._device.type != "cuda" or isinstance(self._module, OnnxModule):
            return None
        setting = self._spec.runtime.cuda_autocast if self._spec is not None else "auto"
        return autocast_dtype(setting, bf16_supported=torch.cuda.is_bf16_supported())


def model_input(
    spec: ModelSpec,
    volume: npt.NDArray[np.number],
    spacing_zyx: tuple[float, float, float],
) -> torch.Tensor:
    """A volume as the network's input: windowed, 2.5-D stacked, at the model spacing.

    The same steps as :meth:`Predictor.predict` before the network (the reference case of
    :mod:`scp_node.inference.verify` is made with it), on the whole volume at once.

    Returns
    -------
    torch.Tensor
        (slices, 2 * context_slices + 1, rows, columns) float32 on the CPU.
    """
    native = (int(volume.shape[1]), int(volume.shape[2]))
    size = resampled_shape(
        native, (float(spacing_zyx[1]), float(spacing_zyx[2])), spec.input.spacing_mm
    )
    context = spec.input.context_slices
    buffer = np.empty((volume.shape[0], 2 * context + 1, *native), dtype=np.float32)
    prepared = _prepare(volume, 0, volume.shape[0], context, _Intensity.of(volume, spec), buffer)
    return resample_inplane(torch.from_numpy(prepared), size, antialias=True)


@dataclass(frozen=True)
class _Intensity:
    """The linear map of modality units to [0, 1]: ``clip((value - low) / span, 0, 1)``."""

    low: np.float32
    span: np.float32

    @classmethod
    def of(cls, volume: npt.NDArray[np.number], spec: ModelSpec) -> _Intensity:
        """The card's window, else robust min-max (0.5 / 99.5 percentiles) of ``volume``.

        Same numbers as :func:`~scp_node.inference.preprocess.normalise` on the whole
        volume, so a batch normalised alone equals its slices of the whole normalised.
        """
        center, width = spec.input.window_center, spec.input.window_width
        if center is not None and width is not None:
            if width <= 0:
                raise ValueError(f"window width must be > 0, got {width}")
            return cls(np.float32(center - width / 2.0), np.float32(width))
        if not volume.size:
            return cls(np.float32(0.0), np.float32(1.0))
        low, high = np.percentile(volume, [0.5, 99.5])
        return cls(np.float32(low), np.float32(float(high - low) or 1.0))


def _prepare(
    volume: npt.NDArray[np.number],
    start: int,
    stop: int,
    context: int,
    intensity: _Intensity,
    buffer: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Slices ``start:stop`` normalised and stacked with their context, in ``buffer``.

    Returns ``buffer[: stop - start]``: (N, 2 * context + 1, rows, columns); beyond the
    first and last slice the edge slice is replicated (as
    :func:`~scp_node.inference.preprocess.stack_context`).
    """
    out = buffer[: stop - start]
    if context == 0:
        source = volume[start:stop, None]
    else:
        offsets = np.arange(-context, context + 1)
        index = np.clip(np.arange(start, stop)[:, None] + offsets[None, :], 0, volume.shape[0] - 1)
        source = volume[index]
    np.subtract(source, intensity.low, out=out, dtype=np.float32)
    np.divide(out, intensity.span, out=out)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def _write_labels(
    logits: torch.Tensor,
    size: tuple[int, int],
    lut: npt.NDArray[np.unsignedinteger],
    out: npt.NDArray[np.unsignedinteger],
) -> None:
    """Label values at ``size`` from (N, K, rows, columns) logits, written into ``out``."""
    if logits.shape[1] == 2 and logits.device.type == "cpu":
        margin = (logits[:, 1] - logits[:, 0]).float().numpy()
        _foreground_into(margin, size, lut[1], out)
        return
    indices = _class_index(logits, size).cpu().numpy()
    if indices.dtype == np.bool_ and lut[1] == 1:
        out[...] = indices
    else:
        np.take(lut, indices.astype(np.intp, copy=False), out=out)


def _bilinear_taps(
    size_in: int, size_out: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Source indices and weight of the second one for each output index, as torch's
    bilinear ``align_corners=False`` computes them (in float32, clamped at the edges)."""
    scale = np.float32(size_in / size_out)
    source = np.maximum((np.arange(size_out, dtype=np.float32) + 0.5) * scale - 0.5, 0)
    first = np.minimum(np.floor(source).astype(np.intp), size_in - 1)
    second = np.minimum(first + 1, size_in - 1)
    weight = (source - first).astype(np.float32)
    return first, second, weight


def _foreground_into(
    margin: npt.NDArray[np.float32],
    size: tuple[int, int],
    value: np.unsignedinteger,
    out: npt.NDArray[np.unsignedinteger],
) -> None:
    """``value`` where the bilinearly upsampled ``margin`` is > 0, else 0, into ``out``.

    The same decision as thresholding ``resample_inplane(margin, size)`` at 0, computed only
    inside each slice's box of output pixels that can be positive: a bilinear value is a
    weighted mean of four source values, so it is <= 0 wherever all four are. Organs fill a
    small part of a slice (and none of many slices), so most of the upsampling is skipped.
    """
    rows = _bilinear_taps(margin.shape[1], size[0])
    columns = _bilinear_taps(margin.shape[2], size[1])
    out[...] = 0
    for plane, target in zip(margin, out, strict=True):
        positive = plane > 0
        if not positive.any():
            continue
        box = []
        for (first, second, _), hits in zip(
            (rows, columns), (positive.any(axis=1), positive.any(axis=0)), strict=True
        ):
            needed = np.flatnonzero(hits[first] | hits[second])
            box.append(slice(int(needed[0]), int(needed[-1]) + 1))
        (r0, r1, rw), (c0, c1, cw) = (
            tuple(tap[box[0]] for tap in rows),
            tuple(tap[box[1]] for tap in columns),
        )
        low, high = int(r0[0]), int(r1[-1]) + 1
        band = plane[low:high]
        # Along the columns first, then the rows: the order of torch's kernel.
        across = band[:, c0] * (1 - cw) + band[:, c1] * cw
        upsampled = across[r0 - low] * (1 - rw)[:, None] + across[r1 - low] * rw[:, None]
        if value == 1:
            target[box[0], box[1]] = upsampled > 0
        else:
            np.multiply(upsampled > 0, value, out=target[box[0], box[1]], casting="unsafe")


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Class indices at ``size`` from logits at the model's resolution.

    The argmax is taken on logits (softmax is monotonic, so it is skipped). Logits are
    resampled bilinearly only when ``size`` differs from theirs; with two classes only
    their difference is resampled (one channel instead of two) and thresholded at 0.

    Parameters
    ----------
    logits
        (N, K, rows, columns) float.
    size
        Output (rows, columns), the native slice size.

    Returns
    -------
    torch.Tensor
        (N, rows, columns) int32; ties go to the lowest index as in :func:`class_argmax`.
    """
    return _class_index(logits, size).to(torch.int32)


def _class_index(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`labels_from_logits` as bool (foreground) for two classes, else int32."""
    if logits.shape[1] == 2:
        margin = resample_inplane((logits[:, 1] - logits[:, 0]).float(), size)
        return margin > 0
    return class_argmax(resample_inplane(logits.float(), size))


def class_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Index of the largest score along axis 1, as int32 (ties: the lowest index).

    Same result as ``scores.argmax(dim=1)`` for finite scores, but element-wise over the
    (few) classes: torch's CPU argmax over a strided class axis of (N, K, 512, 512)
    probabilities cost more than the whole int8 network (26 ms vs 9 ms per slice).

    Parameters
    ----------
    scores
        (N, K, ...) float tensor.

    Returns
    -------
    torch.Tensor
        (N, ...) int32.
    """
    best = scores[:, 0].clone()
    index = torch.zeros(best.shape, dtype=torch.int32, device=scores.device)
    for k in range(1, scores.shape[1]):
        better = scores[:, k] > best
        index.masked_fill_(better, k)
        torch.maximum(best, scores[:, k], out=best)
    return index


def autocast_dtype(setting: str, *, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype for a card's ``runtime.cuda_autocast`` setting.

    Parameters
    ----------
    setting
        ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"none"``.
    bf16_supported
        Whether the GPU computes in bfloat16 (``torch.cuda.is_bf16_supported()``).

    Returns
    -------
    torch.dtype or None
        ``None`` for ``"none"``; ``"auto"`` gives bfloat16 when supported (its range
        matches fp32, so no overflow in logits), else float16.

    Raises
    ------
    ValueError
        Unknown setting.
    """
    if setting == "none":
        return None
    if setting == "bf16" or (setting == "auto" and bf16_supported):
        return torch.bfloat16
    if setting in ("fp16", "auto"):
        return torch.float16
    raise ValueError(f"cuda_autocast must be auto, bf16, fp16 or none, got {setting!r}")


def _select_quantized_engine(engine: str, model: str) -> None:
    if engine not in torch.backends.quantized.supported_engines:
        raise ModelError(
            f"{model}: quantized engine {engine!r} not in this torch build "
            f"({torch.backends.quantized.supported_engines})"
        )
    torch.backends.quantized.engine = engine


class OnnxModule(nn.Module):
    """An ONNX graph behind the ``nn.Module`` call interface (tensors in, tensors out).

    Parameters
    ----------
    path
        The ``.onnx`` file; its first input takes (batch, channels, rows, columns)
        float32, its first output is the logits.
    cuda
        Use ONNX Runtime's CUDA provider when it is installed; otherwise the CPU.
    threads
        Intra-op threads; 0 follows ``torch.get_num_threads()``.
    engine
        ``"ort"`` (ONNX Runtime) or ``"openvino"`` (OpenVINO's CPU plugin, CPU only: it
        runs the same files, int8 QDQ graphs with its own int8 kernels).
    streams
        OpenVINO only: streams sharing the threads, each batch split among them (see
        :func:`~scp_node.inference.runtime.onnx.openvino_session`); 0 gives one stream
        per thread.

    Raises
    ------
    ModelError
        The engine's package is not installed, or it cannot read or compile the file.
    """

    def __init__(
        self,
        path: Path,
        *,
        cuda: bool = False,
        threads: int = 0,
        engine: str = "ort",
        streams: int = 0,
    ) -> None:
        super().__init__()
        threads = threads or torch.get_num_threads()
        self.engine = engine
        self.device_type = "cpu"
        if engine == "openvino":
            self._run = openvino_session(path, threads, streams=streams or threads)
        elif engine == "ort":
            self._run, self.device_type = ort_session(path, threads, cuda=cuda)
        else:
            raise ModelError(f"{path}: unknown engine {engine!r} (known: ort, openvino)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, channels, rows, columns) float32 -> logits of the graph's first output."""
        inputs = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(self._run(inputs)).to(x.device)
