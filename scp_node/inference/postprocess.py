"""Post-processing of a predicted label map: what the card asks for after the network.

A network that classifies voxel by voxel (slice by slice, for the 2-D cards) can leave small
islands of an organ far from the organ itself: a few voxels of "spleen" in the stomach wall.
For a label whose card says ``largest_component = true`` only its largest 3-D connected
component is kept and the rest becomes background, as nnU-Net's post-processing does for
organs that are one piece. Components are 26-connected (voxels touching at a corner are one
piece), so a thin bridge keeps a part attached rather than removing it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from scp_node.inference.registry import LabelSpec

__all__ = ["keep_largest_components"]

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def keep_largest_components(
    labelmap: npt.NDArray[np.unsignedinteger], labels: Iterable[LabelSpec]
) -> dict[str, int]:
    """Clear every component but the largest of each label that asks for it, in place.

    The components are found within the label's bounding box only, so memory stays near
    the size of the organ, not of the study.

    Parameters
    ----------
    labelmap
        (slices, rows, columns) label values (0: background), as a predictor returns it.
    labels
        The card's labels; only those with ``largest_component`` are touched.

    Returns
    -------
    dict
        Label name -> voxels set to background, for the labels that lost any.
    """
    if labelmap.ndim != 3:
        raise ValueError(f"labelmap must be (slices, rows, columns), got {labelmap.shape}")
    removed: dict[str, int] = {}
    for label in labels:
        if not label.largest_component:
            continue
        box = _bounding_box(labelmap == label.value)
        if box is None:
            continue
        window = labelmap[box]
        components, count = ndimage.label(
            window == label.value, structure=_FULL_CONNECTIVITY, output=np.int32
        )
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0  # background of the window
        drop = (components != 0) & (components != int(np.argmax(sizes)))
        window[drop] = 0
        removed[label.name] = int(drop.sum())
    return removed


def _bounding_box(mask: npt.NDArray[np.bool_]) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel, or None when there is none."""
    box: list[slice] = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        if present.size == 0:
            return None
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)
