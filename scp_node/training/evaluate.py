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
from scp_node.inference.postprocess import keep_largest_components
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.training.data import TRAIN_FILE, TrainConfig

__all__ = [
    "dicom_volume",
    "evaluate_series",
    "hausdorff95",
    "labelmap_from_seg",
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


def hausdorff95(
    prediction: npt.NDArray[np.bool_],
    reference: npt.NDArray[np.bool_],
    spacing_zyx: tuple[float, float, float],
) -> float:
    """95th percentile of the symmetric surface distance in mm.

    Surfaces are the voxels of each mask that touch the background (6-neighbourhood);
    distances are Euclidean with the voxel spacing. Returns ``0.0`` when both masks are
    empty and ``inf`` when exactly one is.
    """
    from scipy import ndimage

    if not prediction.any() and not reference.any():
        return 0.0
    if not prediction.any() or not reference.any():
        return float("inf")

    def surface(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        eroded = ndimage.binary_erosion(mask, border_value=0)
        return mask & ~eroded  # type: ignore[no-any-return]

    pred_surface, ref_surface = surface(prediction), surface(reference)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_zyx)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_zyx)
    distances = np.concatenate([to_ref[pred_surface], to_pred[ref_surface]])
    return float(np.percentile(distances, 95))


def labelmap_from_seg(
    seg_bytes: bytes, source_sop_instance_uids: Sequence[str], names: Mapping[str, int]
) -> npt.NDArray[np.uint16]:
    """Read a SEG with highdicom and rebuild the label map on its source images.

    Parameters
    ----------
    seg_bytes
        The encoded SEG (as written by the worker).
    source_sop_instance_uids
        The source images in volume order (axis 0 of the result).
    names
        Segment label -> value to write (the card's ``LabelSpec.value``).

    Returns
    -------
    numpy.ndarray
        (len(source_sop_instance_uids), Rows, Columns) uint16; 0 where no segment is.

    Raises
    ------
    ModelError
        A segment's label is not in ``names``.
    """
    import io

    import highdicom as hd

    seg = hd.seg.segread(io.BytesIO(seg_bytes))
    numbers = list(seg.segment_numbers)
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(source_sop_instance_uids),
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
    )
    out = np.zeros(masks.shape[:3], dtype=np.uint16)
    for channel, number in enumerate(numbers):
        label = str(seg.get_segment_description(number).segment_label)
        if label not in names:
            raise ModelError(f"SEG segment {number} has unknown label {label!r}")
        out[masks[..., channel] > 0] = names[label]
    return out


def evaluate_series(
    model_dir: Path,
    dicom_dir: Path,
    labels_path: Path,
    *,
    variant: str | None = None,
    reference_values: Mapping[str, int] | None = None,
    predictor: Predictor | None = None,
) -> dict[str, float]:
    """Dice and 95% Hausdorff per label through the worker's own path.

    The series is read with :func:`scp_node.dicom.volume.load_volume` (the worker's
    reader: sorting, rescale, JPEG 2000 decoding), segmented by :class:`Predictor`
    (``kind = "volume"`` cards: the volume runtime from
    :func:`~scp_node.inference.runtime.load_runtime`, with the worker's axis directions)
    with the chosen variant, turned into a DICOM SEG by
    :func:`scp_node.output.seg.build_segmentation`, encoded, read back with highdicom
    and compared with the reference labels mapped onto the source pixels in physical
    space (:func:`reference_labels_on_dicom_grid`).

    Parameters
    ----------
    model_dir
        Model folder.
    dicom_dir
        The series' ``.dcm`` files.
    labels_path
        Reference labels (NIfTI, any grid with a valid affine).
    variant
        Card variant to run (``"fp32"``, a ``[variants]`` key, or ``None`` for the
        card's CPU choice).
    reference_values
        Label name -> value in the reference file (default: ``train.toml``'s ``[labels]``).
    predictor
        Predictor to use for slice cards (default: a new CPU one).

    Returns
    -------
    dict
        ``dice_<label>``, ``hd95_mm_<label>`` and ``reference_voxels_<label>`` (0: the
        label is absent from the reference, its Dice says nothing) per card label,
        ``ms_per_slice`` (the runtime alone) and ``slices``.

    Raises
    ------
    ModelError
        The card, weights, variant or reference mapping is missing or invalid.
    """
    import io

    from scp_node.dicom.volume import load_volume
    from scp_node.output.seg import build_segmentation

    spec = ModelSpec.from_model_dir(model_dir)
    if reference_values is None:
        if not (model_dir / TRAIN_FILE).is_file():
            raise ModelError(
                f"no {TRAIN_FILE} in {model_dir}: give each label's value in the reference "
                "file (model evaluate --label NAME=VALUE)"
            )
        reference_values = TrainConfig.from_file(model_dir / TRAIN_FILE).labels
    missing = [label.name for label in spec.labels if label.name not in reference_values]
    if missing:
        raise ModelError(f"no reference value for labels {missing}")
    volume = load_volume(sorted(dicom_dir.glob("*.dcm")))
    if spec.kind == "volume":
        from scp_node.inference.runtime import load_runtime
        from scp_node.inference.runtime.geometry import axis_directions

        runtime = load_runtime(spec, "cpu", variant=variant or "fp32")
        started = time.perf_counter()
        labelmap = runtime.predict(
            volume.array, volume.spacing_zyx, axis_directions(volume.stack.orientation)
        )
        variant_name = str(getattr(runtime, "variant", variant or "fp32"))
    else:
        predictor = predictor or Predictor(device="cpu")
        predictor.load(spec, variant)
        started = time.perf_counter()
        labelmap = predictor.predict(volume.array, volume.spacing_zyx)
        variant_name = str(predictor.variant)
    elapsed = time.perf_counter() - started
    keep_largest_components(labelmap, spec.labels)  # as the worker does after the network
    seg = build_segmentation(volume, labelmap, spec, software_version="evaluation")
    sources = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    if seg is None:
        from_seg = np.zeros(volume.shape, dtype=np.uint16)
    else:
        buffer = io.BytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        from_seg = labelmap_from_seg(
            buffer.getvalue(), sources, {label.name: label.value for label in spec.labels}
        )
    reference = reference_labels_on_dicom_grid(labels_path, volume.datasets)
    scores: dict[str, float] = {}
    for label in spec.labels:
        pred = from_seg == label.value
        ref = reference == reference_values[label.name]
        total = int(pred.sum()) + int(ref.sum())
        scores[f"dice_{label.name}"] = 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total
        scores[f"hd95_mm_{label.name}"] = hausdorff95(pred, ref, volume.spacing_zyx)
        scores[f"reference_voxels_{label.name}"] = float(ref.sum())
    scores["ms_per_slice"] = 1000 * elapsed / volume.shape[0]
    scores["slices"] = float(volume.shape[0])
    logger.info("evaluation of %s (%s): %s", spec.name, variant_name, scores)
    return scores
