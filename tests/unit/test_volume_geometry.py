"""Direction cosines in the volume runtime: a non-axial source gives the same result in
patient space as the axial one.

The source arrays here are built from one axial volume by re-indexing it the way a scanner
would store a sagittal, coronal or feet-first series (rows and columns along the
ImageOrientationPatient cosines); the expected labels are re-indexed the same way. The
network is deliberately direction-sensitive (it marks the face of a bright block on its +x
side), so a volume reoriented wrongly would be labelled on another face.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from scp_node.inference.formats.native import NativeVolumeModel
from scp_node.inference.registry import ModelSpec
from scp_node.inference.runtime.geometry import AXIAL, axis_directions, reorientation
from scp_node.inference.runtime.volume import VolumePredictor, resample_argmax


class _PlusXFace(nn.Module):
    """(N, 1, z, y, x) in [0, 1] -> (N, 2, ...): class 1 where a voxel is brighter than its
    neighbour towards +x (the bright block's face on the model's +x side)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, (1, 1, 3), padding=(0, 0, 1), bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 1.0, -1.0]).view(1, 1, 1, 1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), (self.conv(x) - 0.25) * 20], dim=1)


def _runtime(orientation: str) -> VolumePredictor:
    spec = ModelSpec.model_validate(
        {
            "name": "face",
            "version": "1",
            "kind": "volume",
            "weights": {"format": "torchscript", "file": "unused.pt"},
            "volume": {
                "spacing_mm": (2.0, 1.6, 1.6),
                "patch_size": (16, 16, 16),
                "orientation": orientation,
                "normalisation": {"kind": "window", "center": 150.0, "width": 500.0},
            },
            "labels": [
                {
                    "value": 1,
                    "name": "face",
                    "category": {"code": "91723000", "scheme": "SCT", "meaning": "Anatomy"},
                    "type": {"code": "10200004", "scheme": "SCT", "meaning": "Liver"},
                }
            ],
        }
    )
    runtime = VolumePredictor("cpu")
    runtime.load_model(NativeVolumeModel(_PlusXFace().eval(), spec))
    return runtime


def _axial_volume() -> np.ndarray:
    """(z, y, x) in DICOM pixel order of an axial series: x to Left, y to Posterior."""
    volume = np.full((24, 30, 36), -100.0, dtype=np.float32)
    volume[6:18, 8:22, 10:26] = 400.0
    return volume


def _stored_as(
    axial: np.ndarray, image_orientation: tuple[float, ...]
) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """How a series with ``image_orientation`` stores ``axial``'s voxels: each of its
    array axes is the axial axis it runs along, reversed where it runs the other way."""
    directions = axis_directions(image_orientation)
    permutation, flips = [], []
    for axis, direction in enumerate(directions):
        dots = AXIAL @ direction
        source = int(np.argmax(np.abs(dots)))
        permutation.append(source)
        if dots[source] < 0:
            flips.append(axis)
    return (permutation[0], permutation[1], permutation[2]), tuple(flips)


def _reindex(array: np.ndarray, permutation: tuple[int, ...], flips: tuple[int, ...]) -> np.ndarray:
    out = array.transpose(permutation)
    return np.ascontiguousarray(np.flip(out, flips) if flips else out)


AXIAL_SPACING = (2.5, 0.8, 0.7)

ORIENTATIONS = {
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "axial, rows and columns reversed": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "axial, columns reversed": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
}


@pytest.mark.parametrize("model_orientation", ["RAS", "LPS"])
def test_the_axial_result_is_the_face_on_the_models_plus_x_side(model_orientation: str) -> None:
    volume = _axial_volume()
    labels = _runtime(model_orientation).predict(volume, AXIAL_SPACING)
    face_columns = np.nonzero((labels == 1).any(axis=(0, 1)))[0]
    assert face_columns.size > 0
    # RAS: +x is the patient's Right, the block's lowest DICOM columns (columns run to
    # the Left); LPS: +x is Left, its highest columns.
    if model_orientation == "RAS":
        assert face_columns.min() >= 8 and face_columns.max() <= 12
    else:
        assert face_columns.min() >= 23 and face_columns.max() <= 27


@pytest.mark.parametrize("model_orientation", ["RAS", "LPS"])
@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_a_non_axial_source_gives_the_axial_result_in_patient_space(
    name: str, model_orientation: str
) -> None:
    image_orientation = ORIENTATIONS[name]
    runtime = _runtime(model_orientation)
    axial = _axial_volume()
    expected_axial = runtime.predict(axial, AXIAL_SPACING)
    assert (expected_axial == 1).sum() > 100

    permutation, flips = _stored_as(axial, image_orientation)
    assert permutation != (0, 1, 2) or flips, "the source must differ from the axial one"
    stored = _reindex(axial, permutation, flips)
    spacing = tuple(AXIAL_SPACING[axis] for axis in permutation)
    labels = runtime.predict(stored, spacing, axis_directions(image_orientation))  # type: ignore[arg-type]

    assert labels.shape == stored.shape
    assert np.array_equal(labels, _reindex(expected_axial, permutation, flips))


def test_without_directions_the_source_is_an_axial_series() -> None:
    runtime = _runtime("RAS")
    volume = _axial_volume()
    assert np.array_equal(
        runtime.predict(volume, AXIAL_SPACING),
        runtime.predict(volume, AXIAL_SPACING, axis_directions((1, 0, 0, 0, 1, 0))),
    )


def test_axis_directions_of_an_axial_and_a_sagittal_series() -> None:
    assert np.allclose(axis_directions((1, 0, 0, 0, 1, 0)), [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    # Sagittal: rows run Posterior, columns down (Inferior); the normal is row x column.
    assert np.allclose(axis_directions((0, 1, 0, 0, 0, -1)), [[-1, 0, 0], [0, 0, -1], [0, 1, 0]])
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        axis_directions((1, 0, 0, 1, 0, 0))


def test_reorientation_of_an_axial_series() -> None:
    assert reorientation(AXIAL, "LPS").is_identity
    ras = reorientation(AXIAL, "RAS")
    assert ras.permutation == (0, 1, 2) and ras.flips == (1, 2)
    # x to Posterior, y to Inferior, z to Right: every axis moves.
    pir = reorientation(AXIAL, "PIR")
    assert pir.permutation == (2, 0, 1) and pir.flips == (0, 1)
    array = np.arange(24).reshape(2, 3, 4)
    assert np.array_equal(pir.undo(pir.apply(array)), array)
    assert pir.spacing((3.0, 2.0, 1.0)) == (1.0, 3.0, 2.0)
    with pytest.raises(ValueError, match="three letters"):
        reorientation(AXIAL, "LLS")


def test_an_oblique_series_takes_its_closest_axes() -> None:
    tilt = np.deg2rad(20)
    # Axial with a 20 degree gantry-like rotation about the patient's x axis.
    image_orientation = (1, 0, 0, 0, np.cos(tilt), -np.sin(tilt))
    turn = reorientation(axis_directions(image_orientation), "LPS")
    assert turn.is_identity


def test_resampling_back_from_a_corner_aligned_grid_hits_its_voxels() -> None:
    """MONAI's Spacing puts the first voxel centres of both grids on one point: at half the
    resolution, every second source voxel is exactly a logits voxel."""
    logits = torch.randn((3, 6, 7, 8), generator=torch.Generator().manual_seed(0))
    shape = (11, 13, 15)  # (n - 1) / 0.5 + 1
    labels = resample_argmax(logits, shape, scale=(0.5, 0.5, 0.5))
    assert labels.shape == shape
    assert np.array_equal(labels[::2, ::2, ::2], logits.argmax(0).numpy())
    # Between them, trilinear: a class that wins both neighbours wins the midpoint.
    both = (labels[:-2:2] == labels[2::2])[:, ::2, ::2]
    assert np.array_equal(labels[1::2, ::2, ::2][both], labels[:-2:2, ::2, ::2][both])
