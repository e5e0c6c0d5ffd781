"""Turning a volume into network input, and network output back onto the volume's grid.

Every function here takes and returns arrays (numpy or torch); nothing reads files.
Volumes are (slices, rows, columns) = (z, y, x), see :meth:`Predictor.predict
<scp_node.inference.predictor.Predictor.predict>` for the axis directions.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

__all__ = [
    "normalise",
    "resample_inplane",
    "resampled_shape",
    "stack_context",
    "window",
]


def window(
    volume: npt.NDArray[np.floating], center: float, width: float
) -> npt.NDArray[np.float32]:
    """Window/level to [0, 1].

    Parameters
    ----------
    volume
        Any shape, modality units (HU for CT).
    center, width
        The window: ``center - width/2`` maps to 0, ``center + width/2`` to 1, values
        outside are clipped.

    Returns
    -------
    numpy.ndarray
        Same shape, float32 in [0, 1].

    Raises
    ------
    ValueError
        ``width`` is not positive.
    """
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = center - width / 2.0
    scaled = (np.asarray(volume, dtype=np.float32) - np.float32(low)) / np.float32(width)
    out: npt.NDArray[np.float32] = np.clip(scaled, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def normalise(
    volume: npt.NDArray[np.floating],
    center: float | None,
    width: float | None,
) -> npt.NDArray[np.float32]:
    """Window when a window is given, else robust min-max (0.5 / 99.5 percentiles) to [0, 1].

    Parameters
    ----------
    volume
        Any shape, modality units.
    center, width
        The window (CT); ``None`` for modalities without absolute units (MR).

    Returns
    -------
    numpy.ndarray
        Same shape, float32 in [0, 1].
    """
    if center is not None and width is not None:
        return window(volume, center, width)
    data = np.asarray(volume, dtype=np.float32)
    low, high = np.percentile(data, [0.5, 99.5]) if data.size else (0.0, 1.0)
    span = float(high - low) or 1.0
    out: npt.NDArray[np.float32] = np.clip(
        (data - np.float32(low)) / np.float32(span), 0.0, 1.0
    ).astype(np.float32)
    return out


def resampled_shape(
    shape: tuple[int, int],
    spacing: tuple[float, float],
    target_spacing: tuple[float, float],
) -> tuple[int, int]:
    """In-plane size (rows, columns) after resampling from ``spacing`` to ``target_spacing``.

    The physical extent is kept (rounded to whole pixels, at least 1).
    """
    return (
        max(1, round(shape[0] * spacing[0] / target_spacing[0])),
        max(1, round(shape[1] * spacing[1] / target_spacing[1])),
    )


def resample_inplane(
    data: torch.Tensor,
    size: tuple[int, int],
    mode: str = "bilinear",
    *,
    antialias: bool = False,
) -> torch.Tensor:
    """Resample the last two axes (rows, columns) to ``size``.

    Pixel centres are treated as cell centres (``align_corners=False``), so resampling to
    a new spacing and back to the original size keeps the image registered.

    Parameters
    ----------
    data
        (N, C, rows, columns) or (N, rows, columns) float tensor, any device.
    size
        Output (rows, columns).
    mode
        ``"bilinear"`` for images and probabilities, ``"nearest"`` for label maps.
    antialias
        Low-pass filter when shrinking (bilinear only), so fine-pixel images reach the
        network with the noise level of coarse training images.

    Returns
    -------
    torch.Tensor
        Same leading axes, last two of ``size``, same dtype and device.
    """
    if tuple(data.shape[-2:]) == tuple(size):
        return data
    squeeze = data.dim() == 3
    batch = data.unsqueeze(1) if squeeze else data
    dtype = batch.dtype
    if not batch.is_floating_point():
        batch = batch.float()
    if mode == "nearest":
        out = F.interpolate(batch, size=size, mode="nearest-exact")
    else:
        out = F.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=antialias)
    out = out.to(dtype)
    return out.squeeze(1) if squeeze else out


def stack_context(volume: npt.NDArray[np.float32], context_slices: int) -> npt.NDArray[np.float32]:
    """2.5-D input: each slice with ``context_slices`` neighbours either side as channels.

    Parameters
    ----------
    volume
        (z, rows, columns).
    context_slices
        Neighbours either side; 0 returns a single channel.

    Returns
    -------
    numpy.ndarray
        (z, 2 * context_slices + 1, rows, columns), channel ``context_slices`` is the
        slice itself, channel 0 the lowest z. Beyond the first and last slice the edge
        slice is replicated.

    Raises
    ------
    ValueError
        ``volume`` is not 3-D or ``context_slices`` is negative.
    """
    if volume.ndim != 3:
        raise ValueError(f"volume must be (z, rows, columns), got shape {volume.shape}")
    if context_slices < 0:
        raise ValueError(f"context_slices must be >= 0, got {context_slices}")
    depth = volume.shape[0]
    offsets = np.arange(-context_slices, context_slices + 1)
    index = np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)
    return np.ascontiguousarray(volume[index])
