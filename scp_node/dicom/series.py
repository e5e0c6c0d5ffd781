"""Read a DICOM series from disk: pick the series a model wants, then build a volume.

Two steps, both plain functions of files on disk:

* :func:`choose_series` reads headers only and applies a model's :class:`SeriesRules`
  to every series of a study; it says which series it takes and why it rejected the others.
* :func:`load_volume` reads and decodes one series (JPEG 2000 through pylibjpeg), checks
  that its slices belong together, sorts them along the slice normal and applies the
  rescale, returning a :class:`Volume`.

Reading is tolerant (files without a preamble, missing optional attributes, duplicated
slices), but anything that would put voxels in the wrong place is refused with a
:class:`SeriesError` that names the file and the attribute.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.utils import pixel_array as decode_pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp_node.errors import SeriesError
from scp_node.inference.registry import SeriesRules

__all__ = ["SeriesChoice", "Volume", "choose_series", "load_volume"]

logger = logging.getLogger(__name__)

#: Positions along the slice normal closer than this (mm) are the same slice.
POSITION_TOLERANCE_MM = 1e-3
#: Largest relative deviation of one slice gap from the median gap.
MAX_SPACING_DEVIATION = 0.10
#: Tolerance for comparing direction cosines and pixel spacings between slices.
GEOMETRY_TOLERANCE = 1e-4

_MULTI_FRAME_REASON = "multi-frame images are not supported yet"


@dataclass(frozen=True)
class Volume:
    """A series as one 3-D array on the source image grid.

    Attributes
    ----------
    array : numpy.ndarray
        Shape ``(slices, rows, columns)``, dtype ``float32``, RescaleSlope and
        RescaleIntercept of each slice applied (Hounsfield units for CT). Axis 0 runs in
        increasing position along the slice normal (cross product of the row and column
        direction cosines), axis 1 follows the column direction cosine (down the rows),
        axis 2 the row direction cosine (along a row), exactly as the pixels are stored.
    spacing_zyx : tuple of float
        ``(slice, row, column)`` spacing in mm: the distance between slice centres along
        the slice normal, PixelSpacing[0] (between rows), PixelSpacing[1] (between columns).
    datasets : tuple of pydicom.dataset.Dataset
        The source datasets in the same order as axis 0 (their PixelData is left
        as received; the decoded pixels live only in ``array``).
    series_instance_uid, frame_of_reference_uid, modality : str
        Shared by every slice.
    """

    array: np.ndarray
    spacing_zyx: tuple[float, float, float]
    datasets: tuple[Dataset, ...]
    series_instance_uid: str
    frame_of_reference_uid: str
    modality: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        slices, rows, columns = self.array.shape
        return int(slices), int(rows), int(columns)


@dataclass(frozen=True)
class SeriesChoice:
    """Outcome of :func:`choose_series`.

    Attributes
    ----------
    series_instance_uid : str or None
        The chosen series, or ``None`` when no series satisfies the rules.
    rejected : dict of str to str
        Series Instance UID -> human readable reason (no patient data) for every series
        that was not acceptable. Acceptable series that merely lost to a better one are
        not listed.
    """

    series_instance_uid: str | None
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Candidate:
    series_instance_uid: str
    slices: int
    spacing_mm: float


def choose_series(series_files: Mapping[str, Sequence[Path]], rules: SeriesRules) -> SeriesChoice:
    """Pick the series of a study that a model should run on.

    Reads headers only (``stop_before_pixels=True``). A series is rejected when any of its
    files is unreadable, it holds multi-frame (enhanced) objects, its modality is not in
    ``rules.modalities``, a file lacks ImageOrientationPatient, ImagePositionPatient,
    PixelSpacing or FrameOfReferenceUID, its slices do not share one orientation, it has
    fewer than ``rules.min_slices`` distinct positions, or (``rules.orientation ==
    "axial"``) its slice normal is tilted more than ``rules.max_tilt_deg`` from the
    patient's z axis. Among the acceptable series the one with the most slices wins; a tie
    goes to the smaller slice spacing, then to the smaller UID (deterministic).

    Parameters
    ----------
    series_files : Mapping of str to Sequence of Path
        Series Instance UID -> the files received for it.
    rules : SeriesRules
        The model's selection rules.

    Returns
    -------
    SeriesChoice
        The chosen UID (``None`` when nothing qualifies) and the reason for every rejected
        series. The caller decides whether ``None`` is an error
        (:class:`~scp_node.errors.NoMatchingSeriesError`).
    """
    candidates: list[_Candidate] = []
    rejected: dict[str, str] = {}
    for uid in sorted(series_files):
        result = _assess_series(series_files[uid], rules)
        if isinstance(result, str):
            rejected[uid] = result
            logger.info(
                "series rejected: %s",
                result,
                extra={"series_instance_uid": uid},
            )
        else:
            slices, spacing = result
            candidates.append(_Candidate(uid, slices, spacing))
    if not candidates:
        return SeriesChoice(None, rejected)
    best = min(candidates, key=lambda c: (-c.slices, c.spacing_mm, c.series_instance_uid))
    logger.info(
        "series chosen: %d slices, %.3f mm apart, %d candidate(s), %d rejected",
        best.slices,
        best.spacing_mm,
        len(candidates),
        len(rejected),
        extra={"series_instance_uid": best.series_instance_uid},
    )
    return SeriesChoice(best.series_instance_uid, rejected)


def _assess_series(paths: Sequence[Path], rules: SeriesRules) -> tuple[int, float] | str:
    """``(distinct slices, median spacing)`` when acceptable, else the reason."""
    if not paths:
        return "no files"
    positions: list[float] = []
    orientation: np.ndarray | None = None
    for path in paths:
        try:
            ds = _read(path, stop_before_pixels=True)
        except SeriesError as exc:
            return str(exc)
        if _is_multi_frame(ds):
            return _MULTI_FRAME_REASON
        modality = str(ds.get("Modality", "") or "")
        if modality not in rules.modalities:
            wanted = ", ".join(rules.modalities)
            return f"modality {modality or '(missing)'} is not one of {wanted}"
        missing = [
            keyword
            for keyword in (
                "ImageOrientationPatient",
                "ImagePositionPatient",
                "PixelSpacing",
                "FrameOfReferenceUID",
            )
            if not ds.get(keyword)
        ]
        if missing:
            return f"{path.name}: missing geometry ({', '.join(missing)})"
        try:
            iop = _orientation(ds, path)
            ipp = _vector(ds, "ImagePositionPatient", 3, path)
        except SeriesError as exc:
            return str(exc)
        if orientation is None:
            orientation = iop
        elif not np.allclose(orientation, iop, atol=GEOMETRY_TOLERANCE):
            return f"{path.name}: ImageOrientationPatient differs from the other slices"
        positions.append(float(np.dot(_normal(iop), ipp)))
    assert orientation is not None
    if rules.orientation == "axial":
        tilt = _tilt_deg(orientation)
        if tilt > rules.max_tilt_deg:
            return (
                f"not axial: slice normal {tilt:.1f} degrees from the patient z axis "
                f"(at most {rules.max_tilt_deg:g} allowed)"
            )
    distinct = _distinct_positions(positions)
    if len(distinct) < rules.min_slices:
        return f"{len(distinct)} distinct slice position(s), at least {rules.min_slices} needed"
    gaps = np.diff(distinct)
    spacing = float(np.median(gaps)) if gaps.size else math.inf
    return len(distinct), spacing


def load_volume(paths: Sequence[Path]) -> Volume:
    """Read, decode, check and sort one series into a :class:`Volume`.

    Slices are sorted by their position along the slice normal (the cross product of the
    ImageOrientationPatient row and column cosines, dotted with ImagePositionPatient).
    When several files share one position, the one with the highest InstanceNumber is
    kept and the others are dropped (logged); hospitals re-send corrected images.

    Parameters
    ----------
    paths : Sequence of Path
        The files of one series, in any order.

    Returns
    -------
    Volume
        ``array`` is ``(slices, rows, columns)`` float32 with RescaleSlope/Intercept
        applied per slice (default 1 and 0 when absent).

    Raises
    ------
    SeriesError
        No files; a file is unreadable or cannot be decoded; multi-frame objects; a file
        lacks geometry (ImageOrientationPatient, ImagePositionPatient, PixelSpacing,
        FrameOfReferenceUID); slices differ in ImageOrientationPatient, Rows, Columns,
        PixelSpacing, FrameOfReferenceUID, SeriesInstanceUID or SamplesPerPixel (the
        message names the attribute and the file); or one gap between neighbouring
        slices deviates more than 10 % from the median gap.
    """
    if not paths:
        raise SeriesError("no files to load")
    slices: list[tuple[float, int, Path, Dataset]] = []
    reference: Dataset | None = None
    reference_path: Path | None = None
    for order, path in enumerate(paths):
        ds = _read(path, stop_before_pixels=False)
        if _is_multi_frame(ds):
            raise SeriesError(f"{path.name}: {_MULTI_FRAME_REASON}")
        for keyword in (
            "ImageOrientationPatient",
            "ImagePositionPatient",
            "PixelSpacing",
            "FrameOfReferenceUID",
            "SeriesInstanceUID",
            "Rows",
            "Columns",
            "PixelData",
        ):
            if keyword not in ds or ds[keyword].value in (None, "", b""):
                raise SeriesError(f"{path.name}: {keyword} is missing")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise SeriesError(f"{path.name}: only single-sample (grey scale) images are supported")
        if reference is None or reference_path is None:
            reference, reference_path = ds, path
        else:
            _check_consistent(reference, reference_path, ds, path)
        iop = _orientation(ds, path)
        ipp = _vector(ds, "ImagePositionPatient", 3, path)
        position = float(np.dot(_normal(iop), ipp))
        slices.append((position, order, path, ds))
    assert reference is not None and reference_path is not None

    kept = _drop_duplicates(slices)
    positions = np.array([s[0] for s in kept], dtype=np.float64)
    spacing_z = _slice_spacing(positions, kept[0][3])

    rows, columns = int(reference.Rows), int(reference.Columns)
    array = np.empty((len(kept), rows, columns), dtype=np.float32)
    for index, (_, _, path, ds) in enumerate(kept):
        array[index] = _decode(ds, path, rows, columns)

    pixel_spacing = _vector(reference, "PixelSpacing", 2, reference_path)
    volume = Volume(
        array=array,
        spacing_zyx=(spacing_z, float(pixel_spacing[0]), float(pixel_spacing[1])),
        datasets=tuple(s[3] for s in kept),
        series_instance_uid=str(reference.SeriesInstanceUID),
        frame_of_reference_uid=str(reference.FrameOfReferenceUID),
        modality=str(reference.get("Modality", "") or ""),
    )
    logger.info(
        "volume loaded: %d slices of %dx%d, spacing %.3f/%.3f/%.3f mm",
        array.shape[0],
        rows,
        columns,
        *volume.spacing_zyx,
        extra={"series_instance_uid": volume.series_instance_uid},
    )
    return volume


def _read(path: Path, *, stop_before_pixels: bool) -> Dataset:
    try:
        # force=True: senders and spools are not always careful with the preamble.
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as exc:  # parsing arbitrary bytes fails in many ways (struct.error, ...)
        raise SeriesError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    # With force=True any bytes parse as some dataset; an image has at least these.
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise SeriesError(f"{path.name}: unreadable (not a DICOM image: no SOPClassUID, Modality)")
    return ds


def _is_multi_frame(ds: Dataset) -> bool:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return (
        frames > 1
        or "PerFrameFunctionalGroupsSequence" in ds
        or "SharedFunctionalGroupsSequence" in ds
    )


def _vector(ds: Dataset, keyword: str, length: int, path: Path) -> np.ndarray:
    value: Any = ds.get(keyword)
    try:
        vector = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{path.name}: {keyword} is not numeric") from exc
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise SeriesError(f"{path.name}: {keyword} must hold {length} finite numbers")
    return vector


def _orientation(ds: Dataset, path: Path) -> np.ndarray:
    iop = _vector(ds, "ImageOrientationPatient", 6, path)
    row, column = iop[:3], iop[3:]
    if not (
        math.isclose(float(np.linalg.norm(row)), 1.0, abs_tol=1e-2)
        and math.isclose(float(np.linalg.norm(column)), 1.0, abs_tol=1e-2)
        and abs(float(np.dot(row, column))) < 1e-2
    ):
        raise SeriesError(f"{path.name}: ImageOrientationPatient is not two orthonormal vectors")
    return iop


def _normal(iop: np.ndarray) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)


def _tilt_deg(iop: np.ndarray) -> float:
    cosine = min(1.0, abs(float(_normal(iop)[2])))
    return math.degrees(math.acos(cosine))


def _distinct_positions(positions: Sequence[float]) -> np.ndarray:
    ordered = np.sort(np.asarray(positions, dtype=np.float64))
    if ordered.size == 0:
        return ordered
    keep = np.concatenate(([True], np.diff(ordered) > POSITION_TOLERANCE_MM))
    return ordered[keep]


def _check_consistent(reference: Dataset, reference_path: Path, ds: Dataset, path: Path) -> None:
    def differs(what: str) -> SeriesError:
        return SeriesError(f"{path.name}: {what} differs from {reference_path.name}")

    for keyword in ("Rows", "Columns", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if str(ds[keyword].value) != str(reference[keyword].value):
            raise differs(keyword)
    for keyword, length in (("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        if not np.allclose(
            _vector(ds, keyword, length, path),
            _vector(reference, keyword, length, reference_path),
            atol=GEOMETRY_TOLERANCE,
        ):
            raise differs(keyword)


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _drop_duplicates(
    slices: list[tuple[float, int, Path, Dataset]],
) -> list[tuple[float, int, Path, Dataset]]:
    """One slice per position: the highest InstanceNumber, then the last received."""
    ordered = sorted(slices, key=lambda s: (s[0], s[1]))
    groups: list[list[tuple[float, int, Path, Dataset]]] = []
    for item in ordered:
        if groups and item[0] - groups[-1][0][0] <= POSITION_TOLERANCE_MM:
            groups[-1].append(item)
        else:
            groups.append([item])
    kept: list[tuple[float, int, Path, Dataset]] = []
    for group in groups:
        winner = max(group, key=lambda s: (_instance_number(s[3]), s[1]))
        kept.append(winner)
        if len(group) > 1:
            logger.warning(
                "%d files share one slice position; kept the highest InstanceNumber",
                len(group),
                extra={
                    "series_instance_uid": str(winner[3].SeriesInstanceUID),
                    "sop_instance_uid": str(winner[3].get("SOPInstanceUID", "")),
                    "dropped_sop_instance_uids": [
                        str(s[3].get("SOPInstanceUID", "")) for s in group if s is not winner
                    ],
                },
            )
    return kept


def _slice_spacing(positions: np.ndarray, first: Dataset) -> float:
    """Median gap between slice centres; SpacingBetweenSlices/SliceThickness for one slice."""
    if positions.size < 2:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                value = float(first.get(keyword) or 0.0)
            except (TypeError, ValueError):
                value = 0.0
            if value > 0:
                return value
        return 1.0
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > MAX_SPACING_DEVIATION * median:
        raise SeriesError(
            f"irregular slice spacing: gap of {gaps[worst]:.3f} mm between slices "
            f"{worst} and {worst + 1} (median {median:.3f} mm, at most "
            f"{MAX_SPACING_DEVIATION:.0%} deviation allowed)"
        )
    return median


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files stored without File Meta: infer the (uncompressed) syntax they were read with."""
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr is None or little_endian is None:
        return
    if implicit_vr:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = (
            ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
        )


def _decode(ds: Dataset, path: Path, rows: int, columns: int) -> np.ndarray:
    _ensure_transfer_syntax(ds)
    try:
        # The module function does not cache the decoded pixels on the dataset, so the
        # datasets kept in the Volume stay small.
        pixels = decode_pixel_array(ds)
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise SeriesError(
            f"{path.name}: pixel data cannot be decoded (transfer syntax {syntax}): {exc}"
        ) from exc
    if pixels.shape != (rows, columns):
        raise SeriesError(
            f"{path.name}: decoded pixels have shape {pixels.shape}, expected ({rows}, {columns})"
        )
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{path.name}: RescaleSlope/RescaleIntercept not numeric") from exc
    result = pixels.astype(np.float32)
    if slope != 1.0:
        result *= np.float32(slope)
    if intercept != 0.0:
        result += np.float32(intercept)
    return result
