"""Which way a volume's array axes point in the patient, and how to turn it to a model's.

The worker hands the runtime a (slices, rows, columns) array in the source's stored order
plus the direction of each array axis in the patient (DICOM's LPS frame: x towards the
patient's Left, y Posterior, z Superior), taken from ImageOrientationPatient. A model
expects its arrays in one orientation, written as three letters for the array's x, y and
z axes, i.e. axes 2, 1 and 0 of a (z, y, x) array, each letter the direction the index
increases towards (``LPS``: DICOM pixel order of an axial series; ``RAS``: a NIfTI in
nibabel's canonical orientation, and MONAI's ``Orientationd(axcodes="RAS")`` whose first
spatial axis is x). Turning one into the other is an axis permutation plus flips: no
interpolation, so labels come back exactly onto the source voxels. Oblique directions are
assigned to their closest patient axes as nibabel's ``io_orientation`` does (which MONAI's
``Orientation`` uses too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["AXIAL", "Reorientation", "axis_directions", "reorientation"]

_T = TypeVar("_T", bound=np.generic)

#: Letter -> (patient axis in LPS, sign) of the direction it names.
_LETTERS = {
    "L": (0, 1.0),
    "R": (0, -1.0),
    "P": (1, 1.0),
    "A": (1, -1.0),
    "S": (2, 1.0),
    "I": (2, -1.0),
}


def axis_directions(image_orientation: Sequence[float]) -> npt.NDArray[np.float64]:
    """Patient directions of a (slices, rows, columns) array's axes from its source's
    ImageOrientationPatient.

    Axis 0 runs along the slice normal (row cosine x column cosine; the worker's stacks
    are sorted by increasing position along it), axis 1 down the rows (the column
    cosine), axis 2 along a row (the row cosine).

    Parameters
    ----------
    image_orientation
        The six direction cosines of ImageOrientationPatient.

    Returns
    -------
    numpy.ndarray
        (3, 3) float64; row ``i`` is the LPS unit vector array axis ``i`` points along.

    Raises
    ------
    ValueError
        Not six numbers, or the row and column cosines are zero or parallel.
    """
    values = np.asarray(image_orientation, dtype=np.float64)
    if values.shape != (6,):
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {values.shape}")
    row, column = values[:3], values[3:]
    normal = np.cross(row, column)
    if np.linalg.norm(normal) < 1e-6:
        raise ValueError(f"ImageOrientationPatient {values.tolist()} has no slice normal")
    directions = np.stack([normal, column, row])
    norms: npt.NDArray[np.float64] = np.linalg.norm(directions, axis=1, keepdims=True)
    return directions / norms


#: Directions of an axial series in DICOM pixel order (ImageOrientationPatient 1,0,0,0,1,0).
AXIAL = axis_directions((1.0, 0.0, 0.0, 0.0, 1.0, 0.0))


@dataclass(frozen=True)
class Reorientation:
    """An axis permutation then flips taking a source array to a model's orientation.

    ``oriented = np.flip(source.transpose(permutation), flips)``; :meth:`undo` inverts it.
    """

    permutation: tuple[int, int, int]
    flips: tuple[int, ...]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not self.flips

    def apply(self, array: npt.NDArray[_T]) -> npt.NDArray[_T]:
        """``array`` (3-D) in the model's orientation (a view)."""
        out = array.transpose(self.permutation)
        return np.flip(out, self.flips) if self.flips else out

    def undo(self, array: npt.NDArray[_T]) -> npt.NDArray[_T]:
        """A model-oriented (3-D) ``array`` back in the source's order (a view)."""
        out = np.flip(array, self.flips) if self.flips else array
        inverse = tuple(int(i) for i in np.argsort(self.permutation))
        return out.transpose(inverse)

    def spacing(self, spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
        """The source's per-axis spacing in the model's axis order."""
        first, second, third = (float(spacing_zyx[axis]) for axis in self.permutation)
        return first, second, third


def _closest_axes(directions: npt.NDArray[np.float64]) -> list[tuple[int, float]]:
    """(patient axis, sign) each array axis is closest to, each patient axis used once."""
    from nibabel.orientations import io_orientation

    affine = np.eye(4)
    affine[:3, :3] = directions.T  # columns: where each voxel axis points
    ornt = io_orientation(affine)  # type: ignore[no-untyped-call]
    if np.isnan(ornt).any():
        raise ValueError(f"axis directions {directions.tolist()} are degenerate")
    return [(int(axis), float(sign)) for axis, sign in ornt]


def reorientation(
    directions: npt.NDArray[np.float64] | Sequence[Sequence[float]], orientation: str
) -> Reorientation:
    """How to turn an array whose axes point along ``directions`` into ``orientation``.

    Parameters
    ----------
    directions
        (3, 3): row ``i`` is the LPS direction of array axis ``i`` (see
        :func:`axis_directions`).
    orientation
        Three letters from ``LR``, ``PA``, ``IS``, one of each pair, naming where the
        model's x, y and z axes (array axes 2, 1, 0) point, e.g. ``LPS`` or ``RAS``.

    Returns
    -------
    Reorientation

    Raises
    ------
    ValueError
        ``orientation`` is not such a code, or ``directions`` is not (3, 3) or degenerate.
    """
    code = orientation.upper()
    axes = [_LETTERS.get(letter) for letter in code]
    if len(code) != 3 or None in axes or len({a[0] for a in axes if a}) != 3:
        raise ValueError(
            f"orientation must be three letters, one of each of LR, PA, IS; got {orientation!r}"
        )
    matrix = np.asarray(directions, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f"directions must be (3, 3), got {matrix.shape}")
    source = _closest_axes(matrix)
    permutation: list[int] = []
    flips: list[int] = []
    for target in range(3):
        wanted = axes[2 - target]
        assert wanted is not None
        patient_axis, sign = wanted
        axis = next(j for j, (p, _s) in enumerate(source) if p == patient_axis)
        permutation.append(axis)
        if source[axis][1] != sign:
            flips.append(target)
    return Reorientation((permutation[0], permutation[1], permutation[2]), tuple(flips))
