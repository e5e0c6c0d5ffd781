"""A PNG preview of a segmentation: a few representative slices, windowed, with each
segment's outline in its colour and a legend underneath.

The worker renders it right after the SEG is written and stores it beside the SEG in the
outbox (:func:`preview_path_for`), so the dashboard can show it without decoding DICOM.
Arrays in, image out: this module reads no DICOM and no database.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from scp_node.durable import write_durably
from scp_node.inference.registry import LabelSpec
from scp_node.output.drawing import outline, to_display

__all__ = [
    "LEGEND_PX",
    "TILE_PX",
    "choose_slices",
    "preview_path_for",
    "preview_size",
    "render_preview",
    "write_preview",
]

#: Edge of the square tile each slice is drawn in.
TILE_PX = 256
#: Height of the legend strip under the tiles.
LEGEND_PX = 24
_TEXT = (255, 255, 255)
_BACKGROUND = (0, 0, 0)


def preview_path_for(seg_path: Path) -> Path:
    """Where the preview of the SEG at ``seg_path`` lives: beside it, ``.png`` suffix."""
    return seg_path.with_suffix(".png")


def preview_size(n_slices: int, tile_px: int = TILE_PX) -> tuple[int, int]:
    """(width, height) in pixels of a preview with ``n_slices`` tiles."""
    return n_slices * tile_px, tile_px + LEGEND_PX


def choose_slices(labelmap: NDArray[np.integer], max_slices: int = 4) -> list[int]:
    """Pick up to ``max_slices`` representative slice indices of a (z, y, x) label map.

    Slices with labels are preferred: the one with the largest labelled area, and the rest
    spread evenly over the labelled range. With no label at all, slices spread over the
    whole volume.

    Raises
    ------
    ValueError
        ``labelmap`` is not 3-D or ``max_slices`` is below 1.
    """
    if labelmap.ndim != 3:
        raise ValueError(f"labelmap must be (z, y, x), got shape {labelmap.shape}")
    if max_slices < 1:
        raise ValueError(f"max_slices must be at least 1, got {max_slices}")
    # Slice by slice: over a whole 1000-slice map the axis form makes a volume-sized bool copy.
    area = np.array([np.count_nonzero(plane) for plane in labelmap], dtype=np.int64)
    labelled = np.flatnonzero(area)
    pool = labelled if labelled.size else np.arange(labelmap.shape[0])
    if pool.size <= max_slices:
        return [int(i) for i in pool]
    picks = [int(pool[round(q)]) for q in np.linspace(0, pool.size - 1, max_slices)]
    if labelled.size:
        biggest = int(labelled[np.argmax(area[labelled])])
        if biggest not in picks:
            nearest = min(range(len(picks)), key=lambda i: abs(picks[i] - biggest))
            picks[nearest] = biggest
    return sorted(set(picks))


def _fit(shape: tuple[int, int], tile_px: int) -> tuple[int, int, int, int]:
    """(height, width, top, left) of a (rows, cols) image scaled into the tile."""
    rows, cols = shape
    scale = tile_px / max(rows, cols)
    height, width = max(1, round(rows * scale)), max(1, round(cols * scale))
    return height, width, (tile_px - height) // 2, (tile_px - width) // 2


def render_preview(
    volume: NDArray[np.floating],
    labelmap: NDArray[np.integer],
    labels: Sequence[LabelSpec],
    *,
    window: tuple[float, float] | None = None,
    max_slices: int = 4,
    tile_px: int = TILE_PX,
) -> Image.Image:
    """Draw representative slices with the outline of every label in its colour.

    Parameters
    ----------
    volume : ndarray, shape (z, y, x)
        Image values in modality units (CT: HU after rescale).
    labelmap : ndarray, shape (z, y, x), integer
        The model's output on the same grid; 0 is background.
    labels : sequence of LabelSpec
        The model card's labels (value, name, colour).
    window : (center, width) or None
        Display window in modality units; None uses the 1st-99th percentile of each slice.
    max_slices : int
        How many slices at most (see :func:`choose_slices`).
    tile_px : int
        Edge of the square tile each slice is scaled into (aspect ratio kept).

    Returns
    -------
    PIL.Image.Image
        RGB, size :func:`preview_size` ``(len(slices), tile_px)``; the legend lists the
        labels present in the label map.

    Raises
    ------
    ValueError
        The arrays are not 3-D or their shapes differ.
    """
    if volume.ndim != 3 or volume.shape != labelmap.shape:
        raise ValueError(
            f"volume {volume.shape} and labelmap {labelmap.shape} must be equal (z, y, x) shapes"
        )
    slices = choose_slices(labelmap, max_slices)
    width, height = preview_size(len(slices), tile_px)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    tile_h, tile_w, top, left = _fit((volume.shape[1], volume.shape[2]), tile_px)
    for n, z in enumerate(slices):
        gray = Image.fromarray(to_display(volume[z], window)).resize(
            (tile_w, tile_h), Image.Resampling.BILINEAR
        )
        tile = np.asarray(gray.convert("RGB")).copy()
        for label in labels:
            mask = Image.fromarray((labelmap[z] == label.value).astype(np.uint8) * 255)
            small = np.asarray(mask.resize((tile_w, tile_h), Image.Resampling.NEAREST)) > 0
            if not small.any():
                continue
            tile[outline(small)] = label.color
        x0 = n * tile_px
        canvas.paste(Image.fromarray(tile), (x0 + left, top))
        draw.text((x0 + 4, 2), f"slice {z + 1}/{volume.shape[0]}", fill=_TEXT)
    # Slice by slice, stopping at the first hit: np.unique would sort a copy of the volume.
    labelled = [plane for plane in labelmap if plane.any()]
    x = 6
    for label in labels:
        if not any((plane == label.value).any() for plane in labelled):
            continue
        y = tile_px + (LEGEND_PX - 12) // 2
        draw.rectangle((x, y, x + 11, y + 11), fill=label.color)
        draw.text((x + 16, y), label.name, fill=_TEXT)
        x += 16 + int(draw.textlength(label.name)) + 14
    return canvas


def write_preview(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as PNG to ``path`` durably (``.part``, fsync, rename, fsync the folder).

    Raises
    ------
    OSError
        The file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_durably(path, lambda handle: image.save(handle, format="PNG", optimize=True))
