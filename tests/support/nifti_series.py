"""Write a NIfTI volume as a DICOM CT series stored axially, sagitally or coronally.

Each plane's rows and columns run along patient axes as scanners store them (axial: rows to
Posterior, columns to Left; sagittal: rows to Inferior, columns to Posterior; coronal: rows
to Inferior, columns to Left), with ImageOrientationPatient and ImagePositionPatient from
the NIfTI's affine. :attr:`Series.stored` re-indexes any array on the NIfTI's grid the same
way, so a test can compare a SEG's frames with a reference label map voxel by voxel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from tests.support.datasets import ct_dataset

#: Plane -> (voxel axis across slices, axis down the rows, axis along a row) of a NIfTI in
#: RAS canonical orientation, each with whether its index runs backwards (to L, P or I);
#: slices run along the normal (row cosine x column cosine), the order the node sorts by.
PLANES: dict[str, tuple[tuple[int, bool], tuple[int, bool], tuple[int, bool]]] = {
    "axial": ((2, False), (1, True), (0, True)),
    "sagittal": ((0, False), (2, True), (1, True)),
    "coronal": ((1, True), (2, True), (0, True)),
}


@dataclass(frozen=True)
class Series:
    """The files written (in slice order) and the re-indexing they were written with."""

    files: list[Path]
    stored: Callable[[np.ndarray], np.ndarray]
    image_orientation: tuple[float, ...]


def write_series(nifti: Path, out: Path, plane: str = "axial", **attributes: Any) -> Series:
    """Write ``nifti`` (axis-aligned) as one DICOM file per ``plane`` slice under ``out``.

    ``attributes`` override the data sets' attributes (patient and study identity).
    """
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(nifti))
    affine = np.asarray(image.affine, dtype=np.float64)
    assert np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))), "expects axis-aligned"
    data = np.asarray(image.dataobj, dtype=np.float32)
    axes = PLANES[plane]

    def stored(array: np.ndarray) -> np.ndarray:
        out_array = array.transpose([axis for axis, _ in axes])
        flips = [position for position, (_a, backwards) in enumerate(axes) if backwards]
        return np.ascontiguousarray(np.flip(out_array, flips))

    spacing = np.abs(np.diag(affine[:3, :3]))

    def lps(vector: np.ndarray) -> np.ndarray:
        return vector * np.array([-1.0, -1.0, 1.0])

    def unit(axis: int, backwards: bool) -> np.ndarray:
        vector = np.zeros(3)
        vector[axis] = -1.0 if backwards else 1.0
        return lps(vector)

    (_slice_axis, _), (row_axis, row_back), (column_axis, column_back) = axes
    orientation = (*unit(column_axis, column_back), *unit(row_axis, row_back))
    pixels = stored(data)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True)
    files: list[Path] = []
    for index in range(pixels.shape[0]):
        voxel = np.zeros(3)
        for axis, backwards in axes:
            voxel[axis] = data.shape[axis] - 1 if backwards else 0
        slice_axis, slice_back = axes[0]
        voxel[slice_axis] = data.shape[slice_axis] - 1 - index if slice_back else index
        position = lps((affine @ np.append(voxel, 1.0))[:3])
        defaults: dict[str, Any] = {
            "PatientID": "BUNDLE-A",
            "PatientName": "Subject^A",
            "PatientBirthDate": "",
            "PatientSex": "",
            "StudyDate": "20240101",
            "StudyTime": "120000",
            "StudyID": "1",
            "AccessionNumber": "",
            "ReferringPhysicianName": "",
            "Manufacturer": "test",
            "SeriesNumber": 4,
            "SliceThickness": float(spacing[axes[0][0]]),
        }
        ds = ct_dataset(
            (study, series, generate_uid()),
            size=1,
            **{**defaults, **attributes},
            Rows=pixels.shape[1],
            Columns=pixels.shape[2],
            InstanceNumber=index + 1,
            ImageType=["ORIGINAL", "PRIMARY", plane.upper()],
            FrameOfReferenceUID=frame,
            ImagePositionPatient=[float(v) for v in position],
            ImageOrientationPatient=[float(v) for v in orientation],
            PixelSpacing=[float(spacing[row_axis]), float(spacing[column_axis])],
            RescaleIntercept=0,
            RescaleSlope=1,
            PixelData=np.round(pixels[index]).astype(np.int16).tobytes(),
        )
        path = out / f"{plane}{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Series(files, stored, tuple(float(v) for v in orientation))
