"""A 3-D network in the card's own format (``kind = "volume"``, ``format = "card"``).

The card's ``[weights]`` name a TorchScript or ONNX file taking (N, 1, z, y, x); its
``[volume]`` table gives the spacing, patch, overlap, orientation and normalisation.
"""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.registry import ModelSpec, NormalisationSpec
from scp_node.inference.runtime.volume import Prepared

__all__ = ["NativeVolumeModel", "load_native", "normalise_volume"]


def normalise_volume(
    volume: npt.NDArray[np.float32], spec: NormalisationSpec
) -> npt.NDArray[np.float32]:
    """Intensity normalisation as the card says (see :class:`NormalisationSpec`)."""
    data = np.asarray(volume, dtype=np.float32)
    if spec.kind == "window":
        low = spec.center - spec.width / 2
        out = np.clip((data - np.float32(low)) / np.float32(spec.width), 0.0, 1.0)
    elif spec.kind == "zscore":
        if spec.clip is not None:
            data = np.clip(data, spec.clip[0], spec.clip[1])
        out = (data - np.float32(spec.mean)) / np.float32(spec.std)
    else:
        low, high = np.percentile(data, [spec.low, spec.high]) if data.size else (0.0, 1.0)
        span = float(high - low) or 1.0
        out = np.clip((data - np.float32(low)) / np.float32(span), 0.0, 1.0)
    result: npt.NDArray[np.float32] = np.asarray(out, dtype=np.float32)
    return result


class NativeVolumeModel:
    """A card-described 3-D network; attributes follow ``VolumeModel``."""

    def __init__(self, network: nn.Module, spec: ModelSpec) -> None:
        self.networks: tuple[nn.Module, ...] = (network,)
        self._spec = spec
        self.patch_size = spec.volume.patch_size
        self.tile_step_size = max(1e-3, 1.0 - spec.volume.overlap)
        self.mirror_axes: tuple[int, ...] = ()
        self.class_values = (0, *(label.value for label in spec.labels))
        self.orientation: str = spec.volume.orientation

    def prepare(
        self, volume: npt.NDArray[np.float32], spacing_zyx: tuple[float, float, float]
    ) -> Prepared:
        """Normalise, then resample trilinearly to the card's spacing."""
        shape = tuple(int(s) for s in volume.shape)
        target = tuple(
            max(1, round(n * s / t))
            for n, s, t in zip(shape, spacing_zyx, self._spec.volume.spacing_mm, strict=True)
        )
        data = torch.from_numpy(normalise_volume(volume, self._spec.volume.normalisation))
        if target != shape:
            data = F.interpolate(data[None, None], size=target, mode="trilinear")[0, 0]
        full = (shape[0], shape[1], shape[2])
        return Prepared(
            data=data[None].numpy().astype(np.float32, copy=False),
            crop_shape=full,
            bbox=(slice(0, full[0]), slice(0, full[1]), slice(0, full[2])),
            full_shape=full,
        )


def load_native(spec: ModelSpec, device: torch.device) -> NativeVolumeModel:
    """Load the card's ``[weights]`` as a 3-D network.

    Raises
    ------
    ModelError
        The weights format is not TorchScript or ONNX, or the file cannot be read.
    """
    weights = spec.weights
    path = spec.directory / weights.file
    if weights.format == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
                network = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelError(f"{spec.name}: cannot load weights {path}: {exc}") from exc
    elif weights.format == "onnx":
        from scp_node.inference.predictor import OnnxModule

        network = OnnxModule(path, cuda=device.type == "cuda")
    else:
        raise ModelError(
            f"{spec.directory / 'model.toml'}: weights.format {weights.format!r}: a volume "
            "card takes torchscript or onnx weights"
        )
    return NativeVolumeModel(network.eval(), spec)
