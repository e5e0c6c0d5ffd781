"""SEG preview PNG: size, outlines where the labels are, legend, written atomically."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scp_node.inference.registry import CodeSpec, LabelSpec
from scp_node.output.preview import (
    LEGEND_PX,
    TILE_PX,
    choose_slices,
    preview_path_for,
    preview_size,
    render_preview,
    write_preview,
)

_CODE = CodeSpec(code="123037004", scheme="SCT", meaning="Anatomical Structure")
LIVER = LabelSpec(value=1, name="liver", category=_CODE, type=_CODE, color=(255, 0, 255))
SPLEEN = LabelSpec(value=2, name="spleen", category=_CODE, type=_CODE, color=(0, 255, 0))


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """10 slices of 64x64 HU; liver (a square) in slices 3-6, spleen in slice 5 only."""
    volume = np.full((10, 64, 64), -1000.0, dtype=np.float32)
    volume[:, 8:56, 8:56] = 40.0
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:7, 16:40, 16:40] = 1
    labels[5, 44:52, 44:52] = 2
    return volume, labels


def _pixels_of(image: Image.Image, color: tuple[int, int, int]) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"))
    return np.all(rgb == np.array(color, dtype=np.uint8), axis=-1)


def test_choose_slices_prefers_labelled_and_keeps_the_largest() -> None:
    _, labels = _phantom()
    chosen = choose_slices(labels, max_slices=3)
    assert len(chosen) == 3
    assert set(chosen) <= {3, 4, 5, 6}
    assert 5 in chosen  # liver + spleen: the largest labelled area
    assert choose_slices(np.zeros((8, 4, 4), dtype=np.uint8), max_slices=2) == [0, 7]
    assert choose_slices(labels, max_slices=10) == [3, 4, 5, 6]


def test_choose_slices_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="labelmap must be"):
        choose_slices(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="max_slices"):
        choose_slices(np.zeros((2, 4, 4), dtype=np.uint8), max_slices=0)


def test_preview_has_outlines_in_label_colours_where_labels_are() -> None:
    volume, labels = _phantom()
    image = render_preview(volume, labels, [LIVER, SPLEEN], window=(40.0, 400.0), max_slices=4)
    assert image.size == preview_size(4) == (4 * TILE_PX, TILE_PX + LEGEND_PX)
    chosen = choose_slices(labels, 4)
    assert chosen == [3, 4, 5, 6]
    scale = TILE_PX / 64
    for n, z in enumerate(chosen):
        tile = image.crop((n * TILE_PX, 0, (n + 1) * TILE_PX, TILE_PX))
        liver = _pixels_of(tile, LIVER.color)
        ys, xs = np.nonzero(liver)
        assert ys.size > 0, f"no liver outline on slice {z}"
        # The outline lies on the square's border (16..40 in source pixels), not inside it.
        assert ys.min() >= 16 * scale - 1 and ys.max() <= 40 * scale + 1
        assert xs.min() >= 16 * scale - 1 and xs.max() <= 40 * scale + 1
        centre = liver[int(20 * scale) : int(36 * scale), int(20 * scale) : int(36 * scale)]
        assert not centre.any(), "the inside of the liver must show the image, not fill"
        has_spleen = _pixels_of(tile, SPLEEN.color).any()
        assert has_spleen == (z == 5)
    legend = image.crop((0, TILE_PX, image.width, image.height))
    assert _pixels_of(legend, LIVER.color).sum() >= 100  # the swatch
    assert _pixels_of(legend, SPLEEN.color).sum() >= 100


def test_preview_window_maps_soft_tissue_to_mid_grey() -> None:
    volume, labels = _phantom()
    image = render_preview(volume, labels, [LIVER], window=(40.0, 400.0), max_slices=1)
    gray = np.asarray(image.convert("L"))
    assert gray[TILE_PX // 2 + 60, TILE_PX // 2 + 60] in range(120, 136)  # 40 HU mid-window
    assert gray[2, TILE_PX - 3] == 0  # air is black


def test_preview_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="must be equal"):
        render_preview(
            np.zeros((2, 4, 4), dtype=np.float32), np.zeros((2, 4, 5), dtype=np.uint8), [LIVER]
        )


def test_write_preview_round_trips_as_png(tmp_path: Path) -> None:
    volume, labels = _phantom()
    seg_path = tmp_path / "outbox" / "7" / "1.2.3.dcm"
    target = preview_path_for(seg_path)
    assert target == tmp_path / "outbox" / "7" / "1.2.3.png"
    write_preview(render_preview(volume, labels, [LIVER, SPLEEN]), target)
    assert not list(target.parent.glob("*.part"))
    with Image.open(BytesIO(target.read_bytes())) as png:
        assert png.format == "PNG"
        assert png.size == preview_size(4)
