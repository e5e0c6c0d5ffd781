"""Sliding-window inference with Gaussian blending, stitched on the CPU.

nnU-Net's scheme (``nnUNetPredictor.predict_sliding_window_return_logits``): the image is
padded to at least one patch (centred, zeros), windows start at nnU-Net's evenly spread
steps, each window's logits are weighted by a Gaussian (sigma = patch / 8) and summed; the
sum is divided by the summed weights. Windows run in batches on the network's device;
only one batch of logits lives there, the stitched logits live on the CPU in float16 as
in nnU-Net, the weights in float32.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

__all__ = ["gaussian_weights", "sliding_window_logits", "window_starts"]


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """Start indices along one axis, as ``nnunetv2``'s ``compute_steps_for_sliding_window``.

    Parameters
    ----------
    size
        Axis length (>= ``patch``).
    patch
        Window length.
    step
        Largest step as a fraction of ``patch`` (0 < step <= 1).

    Raises
    ------
    ValueError
        ``size < patch`` or ``step`` outside (0, 1].
    """
    if size < patch:
        raise ValueError(f"axis of {size} is shorter than the patch ({patch})")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    count = int(np.ceil((size - patch) / (patch * step))) + 1
    if count == 1:
        return [0]
    actual = (size - patch) / (count - 1)
    return [int(np.round(actual * i)) for i in range(count)]


def gaussian_weights(patch: Sequence[int]) -> torch.Tensor:
    """nnU-Net's importance map: a Gaussian, sigma = patch / 8, peak 10, in float16, its
    zeros (underflow) replaced by its smallest value."""
    delta = np.zeros(tuple(patch))
    delta[tuple(p // 2 for p in patch)] = 1
    weights = gaussian_filter(delta, [p / 8 for p in patch], 0, mode="constant", cval=0)
    weights /= weights.max() / 10
    out = torch.from_numpy(weights).half()
    zero = out == 0
    if zero.any():
        out[zero] = out[~zero].min()
    return out


def _windows(
    shape: Sequence[int], patch: Sequence[int], step: float
) -> Iterator[tuple[slice, ...]]:
    starts = [window_starts(s, p, step) for s, p in zip(shape, patch, strict=True)]
    for corner in itertools.product(*starts):
        yield tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))


def _forward(
    networks: Sequence[nn.Module], batch: torch.Tensor, mirror_axes: Sequence[int]
) -> torch.Tensor:
    """Logits averaged over the folds and, when asked, over mirrored copies."""
    total: torch.Tensor | None = None
    flips = [
        combo
        for k in range(len(mirror_axes) + 1)
        for combo in itertools.combinations([a + 2 for a in mirror_axes], k)
    ]
    for network in networks:
        for dims in flips:
            x = torch.flip(batch, dims) if dims else batch
            y = network(x).float()
            y = torch.flip(y, dims) if dims else y
            total = y if total is None else total + y
    assert total is not None
    return total / (len(networks) * len(flips))


def sliding_window_logits(
    data: npt.NDArray[np.float32],
    networks: Sequence[nn.Module],
    patch_size: Sequence[int],
    num_classes: int,
    *,
    step: float = 0.5,
    batch_size: int = 2,
    mirror_axes: Sequence[int] = (),
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logits of ``data`` by Gaussian-blended sliding windows.

    Parameters
    ----------
    data
        (channels, z, y, x) float32, normalised, at the networks' spacing.
    networks
        Each maps (N, channels, *patch) to (N, num_classes, *patch); logits are averaged.
    patch_size
        Window (z, y, x).
    num_classes
        Output channels.
    step
        Window step as a fraction of the patch.
    batch_size
        Windows per forward pass.
    mirror_axes
        Spatial axes (0..2) to mirror for test-time augmentation.
    device
        Where the networks run (CPU by default); the result is always on the CPU.

    Returns
    -------
    torch.Tensor
        (num_classes, z, y, x) float16 on the CPU, same grid as ``data``.

    Raises
    ------
    ValueError
        ``data`` is not 4-D or ``batch_size`` < 1.
    """
    if data.ndim != 4:
        raise ValueError(f"data must be (channels, z, y, x), got shape {data.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device or torch.device("cpu")
    shape = data.shape[1:]
    padded_shape = [max(s, p) for s, p in zip(shape, patch_size, strict=True)]
    before = [(ps - s) // 2 for ps, s in zip(padded_shape, shape, strict=True)]
    image = torch.zeros((data.shape[0], *padded_shape), dtype=torch.float32)
    inner = tuple(slice(b, b + s) for b, s in zip(before, shape, strict=True))
    image[(slice(None), *inner)] = torch.from_numpy(data)
    logits = torch.zeros((num_classes, *padded_shape), dtype=torch.float16)
    weight_sum = torch.zeros(padded_shape, dtype=torch.float16)
    gaussian = gaussian_weights(patch_size)
    gaussian_device = gaussian.to(device)
    windows = list(_windows(padded_shape, patch_size, step))
    with torch.inference_mode():
        for first in range(0, len(windows), batch_size):
            chunk = windows[first : first + batch_size]
            batch = torch.stack([image[(slice(None), *w)] for w in chunk]).to(device)
            out = (_forward(networks, batch, mirror_axes) * gaussian_device).cpu()
            for k, window in enumerate(chunk):
                logits[(slice(None), *window)] += out[k]
                weight_sum[window] += gaussian
        torch.div(logits, weight_sum, out=logits)
    return logits[(slice(None), *inner)]
