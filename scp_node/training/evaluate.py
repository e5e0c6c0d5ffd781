"""Evaluation of a model folder on a real DICOM series against reference labels (NIfTI)
mapped onto the DICOM grid in physical space.

Reference labels are never indexed voxel by voxel against the images: NIfTI files and
DICOM pixel arrays often differ by flips (subject B's labels are flipped along y). Each
DICOM pixel's patient position (LPS) is computed from ImagePositionPatient,
ImageOrientationPatient and PixelSpacing, converted to RAS, and looked up (nearest
neighbour) in the NIfTI through its inverse affine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom

from scp_node.errors import ModelError
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.training.data import TRAIN_FILE, TrainConfig

__all__ = [
    "dicom_volume",
    "evaluate_on_dicom",
    "read_dicom_series",
    "reference_labels_on_dicom_grid",
]

logger = logging.getLogger(__name__)


def _normal(dataset: pydicom.Dataset) -> npt.NDArray[np.float64]:
    orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
    return np.cross(orientation[:3], orientation[3:])


def read_dicom_series(dicom_dir: Path) -> list[pydicom.Dataset]:
    """Read ``dicom_dir/*.dcm`` and sort by position along the slice normal (ascending).

    Raises
    ------
    ModelError
        The folder holds no ``.dcm`` file.
    """
    files = sorted(dicom_dir.glob("*.dcm"))
    if not files:
        raise ModelError(f"no .dcm files in {dicom_dir}")
    datasets = [pydicom.dcmread(path) for path in files]
    normal = _normal(datasets[0])
    return sorted(
        datasets,
        key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))),
    )


def dicom_volume(
    datasets: Sequence[pydicom.Dataset],
) -> tuple[npt.NDArray[np.float32], tuple[float, float, float]]:
    """Pixel data of sorted single-frame datasets as the predictor's input.

    Returns
    -------
    tuple
        ``(volume, spacing_zyx)``: (slices, rows, columns) float32 with the modality rescale
        applied, and (slice distance, row spacing, column spacing) in mm.
    """
    volume = np.stack(
        [
            ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1.0))
            + float(getattr(ds, "RescaleIntercept", 0.0))
            for ds in datasets
        ]
    )
    normal = _normal(datasets[0])
    positions = [
        float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))) for ds in datasets
    ]
    distance = float(np.median(np.diff(positions))) if len(positions) > 1 else 1.0
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    return volume, (abs(distance) or 1.0, row_spacing, column_spacing)


def reference_labels_on_dicom_grid(
    nifti_path: Path, datasets: Sequence[pydicom.Dataset]
) -> npt.NDArray[np.int32]:
    """Reference labels resampled (nearest neighbour, physical space) onto DICOM pixels.

    Parameters
    ----------
    nifti_path
        Label volume (NIfTI) with a valid affine (RAS world coordinates).
    datasets
        Single-frame images; the output keeps their order.

    Returns
    -------
    numpy.ndarray
        (len(datasets), Rows, Columns) int32 label values of the NIfTI; 0 where a pixel
        falls outside the NIfTI volume.
    """
    image: Any = nib.load(nifti_path)  # nibabel types the loader's result loosely
    labels = np.asanyarray(image.dataobj)
    inverse = np.linalg.inv(image.affine)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    out = np.zeros((len(datasets), int(datasets[0].Rows), int(datasets[0].Columns)), np.int32)
    for k, ds in enumerate(datasets):
        orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        row_dir, col_dir = orientation[:3], orientation[3:]
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        rows, columns = int(ds.Rows), int(ds.Columns)
        r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
        # DICOM: position = IPP + column index * column spacing * (direction along a row)
        #                       + row index * row spacing * (direction along a column).
        lps = (
            np.asarray(ds.ImagePositionPatient, dtype=np.float64)[None, None, :]
            + c[..., None] * column_spacing * row_dir
            + r[..., None] * row_spacing * col_dir
        )
        ras = lps @ lps_to_ras.T
        ijk = ras @ inverse[:3, :3].T + inverse[:3, 3]
        index = np.rint(ijk).astype(np.int64)
        inside = np.all((index >= 0) & (index < np.asarray(labels.shape[:3])), axis=-1)
        plane = np.zeros((rows, columns), np.int32)
        i, j, kk = index[inside].T
        plane[inside] = labels[i, j, kk]
        out[k] = plane
    return out


def evaluate_on_dicom(
    model_dir: Path,
    dicom_dir: Path,
    labels_path: Path,
    *,
    reference_values: Mapping[str, int] | None = None,
    predictor: Predictor | None = None,
) -> dict[str, float]:
    """Dice per label of the model in ``model_dir`` on a DICOM series.

    Parameters
    ----------
    model_dir
        Model folder (``model.toml`` + weights).
    dicom_dir
        Folder of the series' ``.dcm`` files.
    labels_path
        Reference labels (NIfTI) of the same patient, any grid with a valid affine.
    reference_values
        Label name -> value in the reference file. Default: the ``[labels]`` table of
        ``model_dir/train.toml``.
    predictor
        Predictor to use (default: a new CPU one).

    Returns
    -------
    dict
        ``{label name: Dice}`` over the whole series, plus ``"ms_per_slice"``.

    Raises
    ------
    ModelError
        The card, weights or reference mapping is missing or invalid.
    """
    spec = ModelSpec.from_model_dir(model_dir)
    if reference_values is None:
        reference_values = TrainConfig.from_file(model_dir / TRAIN_FILE).labels
    predictor = predictor or Predictor(device="cpu")
    predictor.load(spec)
    datasets = read_dicom_series(dicom_dir)
    volume, spacing = dicom_volume(datasets)
    started = time.perf_counter()
    prediction = predictor.predict(volume, spacing)
    elapsed = time.perf_counter() - started
    reference = reference_labels_on_dicom_grid(labels_path, datasets)
    scores: dict[str, float] = {}
    for label in spec.labels:
        if label.name not in reference_values:
            raise ModelError(f"no reference value for label {label.name!r}")
        pred = prediction == label.value
        ref = reference == reference_values[label.name]
        total = int(pred.sum()) + int(ref.sum())
        scores[label.name] = 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total
    scores["ms_per_slice"] = 1000 * elapsed / len(datasets)
    logger.info("evaluation on %s: %s", dicom_dir, scores)
    return scores
