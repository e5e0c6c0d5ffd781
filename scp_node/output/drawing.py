"""Pixel helpers shared by the PNG preview and the burned-in overlays: display windowing and
segment outlines. Arrays in, arrays out."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

__all__ = ["auto_window", "outline", "to_display"]

#: Percentiles of the image values a window without a card setting spans.
_AUTO_PERCENTILES = (1.0, 99.0)


def auto_window(image: NDArray[np.floating]) -> tuple[float, float]:
    """(center, width) spanning the 1st to 99th percentile of ``image`` (any shape)."""
    low, high = (float(v) for v in np.percentile(image, _AUTO_PERCENTILES))
    return (low + high) / 2.0, high - low


def to_display(
    image: NDArray[np.floating], window: tuple[float, float] | None
) -> NDArray[np.uint8]:
    """Map ``image`` through the display window ``(center, width)`` to 0..255.

    Values below ``center - width/2`` are black, above ``center + width/2`` white.
    ``None`` uses :func:`auto_window` of ``image`` itself. A width of zero or less is
    treated as a tiny positive one (a step at the center).
    """
    center, width = auto_window(image) if window is None else window
    low, high = center - width / 2.0, center + width / 2.0
    scaled = (image.astype(np.float32) - low) / max(high - low, 1e-6)
    out: NDArray[np.uint8] = (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out


def outline(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The border of a 2-D mask, two pixels wide and inside the mask.

    Inside keeps the outline on the segment itself: the pixels just outside stay the
    source's, so the reader sees the anatomy the boundary was drawn on.
    """
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    result: NDArray[np.bool_] = ndimage.binary_dilation(edge) & mask
    return result
