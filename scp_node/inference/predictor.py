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

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.nets import build_network
from scp_node.inference.preprocess import (
    normalise,
    resample_inplane,
    resampled_shape,
    stack_context,
)
from scp_node.inference.registry import ModelSpec

__all__ = ["Predictor"]

logger = logging.getLogger(__name__)


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
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {device!r} asked for but CUDA is not available")
        elif device != "cpu":
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}")
        if threads > 0:
            torch.set_num_threads(threads)
        self._device = torch.device(device)
        self.batch_size = batch_size
        self._module: nn.Module | None = None
        self._spec: ModelSpec | None = None

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

    def load(self, spec: ModelSpec) -> None:
        """Load the weights named by ``spec`` onto this predictor's device, in eval mode.

        ``state_dict`` weights are loaded into ``spec.weights.architecture`` built with
        ``spec.weights.params``; ``torchscript`` files with :func:`torch.jit.load`.

        Raises
        ------
        ModelError
            The format is not supported (``onnx``), the file cannot be read, or the
            weights do not fit the architecture.
        """
        path = spec.weights_path
        fmt = spec.weights.format
        try:
            if fmt == "state_dict":
                assert spec.weights.architecture is not None  # the card validates this
                module = build_network(spec.weights.architecture, dict(spec.weights.params))
                state = torch.load(path, map_location=self._device, weights_only=True)
                if isinstance(state, dict) and "state_dict" in state:
                    state = state["state_dict"]
                module.load_state_dict(state)
            elif fmt == "torchscript":
                module = torch.jit.load(  # type: ignore[no-untyped-call]
                    str(path), map_location=self._device
                )
            else:
                raise ModelError(f"{spec.name}: weights format {fmt!r} is not supported")
        except ModelError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{spec.name}: cannot load weights {path}: {exc}") from exc
        self.load_module(module, spec)
        logger.info("loaded model %s %s (%s) on %s", spec.name, spec.version, fmt, self.device)

    def load_module(self, module: nn.Module, spec: ModelSpec) -> None:
        """Use a ready ``module`` with ``spec``'s input contract and labels.

        The module must map (batch, 2 * context_slices + 1, rows, columns) float32 to
        (batch, len(spec.labels) + 1, rows, columns) logits.
        """
        self._module = module.to(self._device).eval()
        self._spec = spec

    def predict(
        self, volume: npt.NDArray[np.floating], spacing_zyx: tuple[float, float, float]
    ) -> npt.NDArray[np.unsignedinteger]:
        """Segment a volume.

        Parameters
        ----------
        volume
            (slices, rows, columns) in modality units (HU for CT, rescale applied), in the
            DICOM pixel order of an axial series: axis 2 (columns) towards patient Left,
            axis 1 (rows) towards Posterior, axis 0 along the slice normal (increasing
            index = Superior for orientation [1,0,0,0,1,0]). Any float dtype.
        spacing_zyx
            Slice distance, row spacing and column spacing in mm (DICOM PixelSpacing is
            (row, column)). Only the in-plane spacings are used: slices are processed
            one by one and the 2.5-D context takes neighbours by index.

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
        lut = np.asarray([0, *values], dtype=np.uint16)
        native = (int(volume.shape[1]), int(volume.shape[2]))
        model_size = resampled_shape(
            native, (float(spacing_zyx[1]), float(spacing_zyx[2])), spec.input.spacing_mm
        )
        image = normalise(volume, spec.input.window_center, spec.input.window_width)
        stacked = stack_context(image, spec.input.context_slices)
        try:
            indices = self._run(stacked, model_size, native)
        except torch.OutOfMemoryError:
            if self._device.type != "cuda":
                raise
            logger.warning("CUDA out of memory: falling back to the CPU for this model")
            assert self._module is not None
            self._device = torch.device("cpu")
            self._module = self._module.to(self._device)
            torch.cuda.empty_cache()
            indices = self._run(stacked, model_size, native)
        labels: npt.NDArray[np.unsignedinteger] = lut[indices]
        if max(values) <= 255:
            labels = labels.astype(np.uint8)
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
        stacked: npt.NDArray[np.float32],
        model_size: tuple[int, int],
        native: tuple[int, int],
    ) -> npt.NDArray[np.uint16]:
        """Class indices (slices, rows, columns) for (slices, C, rows, columns) input."""
        assert self._module is not None
        # uint16 holds any class index a card allows and is 4x smaller than argmax's int64.
        out = np.empty((stacked.shape[0], *native), dtype=np.uint16)
        with torch.inference_mode(), self._autocast():
            for start in range(0, stacked.shape[0], self.batch_size):
                batch = torch.from_numpy(stacked[start : start + self.batch_size]).to(self._device)
                batch = resample_inplane(batch, model_size, antialias=True)
                logits = self._module(batch).float()
                probs = resample_inplane(logits.softmax(dim=1), native)
                out[start : start + len(batch)] = probs.argmax(dim=1).cpu().numpy()
        return out

    def _autocast(self) -> contextlib.AbstractContextManager[None]:
        if self._device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
