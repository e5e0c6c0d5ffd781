"""Keeping the largest connected component of the labels whose card asks for it."""

from __future__ import annotations

import numpy as np
import pytest

from scp_node.inference.postprocess import keep_largest_components
from scp_node.inference.registry import CodeSpec, LabelSpec

_CODE = CodeSpec(code="123037004", scheme="SCT", meaning="Anatomical Structure")


def _label(value: int, name: str, largest: bool) -> LabelSpec:
    return LabelSpec(value=value, name=name, category=_CODE, type=_CODE, largest_component=largest)


def test_only_the_largest_piece_of_a_flagged_label_stays() -> None:
    labels = np.zeros((6, 20, 20), dtype=np.uint8)
    labels[1:5, 2:10, 2:10] = 1  # the organ: 256 voxels
    labels[2, 15:17, 15:17] = 1  # an island: 4 voxels
    labels[0, 18, 0] = 1  # another: 1 voxel
    before = labels.copy()

    removed = keep_largest_components(labels, [_label(1, "spleen", largest=True)])

    assert removed == {"spleen": 5}
    assert (labels[1:5, 2:10, 2:10] == 1).all()
    assert labels[2, 15:17, 15:17].sum() == 0 and labels[0, 18, 0] == 0
    assert int((labels == 1).sum()) == int((before == 1).sum()) - 5


def test_unflagged_labels_and_other_labels_are_left_alone() -> None:
    labels = np.zeros((4, 16, 16), dtype=np.uint8)
    labels[0:3, 0:6, 0:6] = 1
    labels[0, 12:14, 12:14] = 1  # island of the flagged label
    labels[1, 8:10, 0:2] = 2  # bowel in two pieces: not flagged
    labels[3, 14:16, 14:16] = 2
    bowel_before = labels == 2

    removed = keep_largest_components(
        labels, [_label(1, "liver", largest=True), _label(2, "bowel", largest=False)]
    )

    assert removed == {"liver": 4}
    np.testing.assert_array_equal(labels == 2, bowel_before)


def test_pieces_touching_at_a_corner_are_one_component() -> None:
    labels = np.zeros((3, 8, 8), dtype=np.uint8)
    labels[0, 0:3, 0:3] = 1
    labels[1, 3, 3] = 1  # touches the block only diagonally (a corner, across slices)
    labels[2, 4:6, 4:6] = 1  # touches that voxel at a corner
    before = labels.copy()

    assert keep_largest_components(labels, [_label(1, "liver", largest=True)]) == {}
    np.testing.assert_array_equal(labels, before)


def test_an_absent_label_or_a_single_piece_changes_nothing() -> None:
    labels = np.zeros((3, 8, 8), dtype=np.uint16)
    labels[1, 2:4, 2:4] = 300
    before = labels.copy()

    removed = keep_largest_components(
        labels, [_label(300, "liver", largest=True), _label(7, "spleen", largest=True)]
    )

    assert removed == {}
    np.testing.assert_array_equal(labels, before)


def test_a_label_map_that_is_not_3d_is_refused() -> None:
    with pytest.raises(ValueError, match="slices, rows, columns"):
        keep_largest_components(np.zeros((8, 8), dtype=np.uint8), [])
