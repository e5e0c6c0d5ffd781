"""One DICOM instance's frames: position, orientation and pixel spacing of each.

A single-frame image is one frame; an Enhanced or Legacy Converted Enhanced CT/MR image has
one frame per item of its Per-Frame Functional Groups Sequence, each frame's geometry taken
from its own functional groups or, failing that, the shared ones. Each frame also carries the
attributes that tell acquisitions at one position apart (dimension index, temporal position,
echo, acquisition number), for :mod:`scp_node.dicom.volume` to split stacks by.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from scp_node.errors import SeriesError

__all__ = [
    "FrameHeader",
    "HeaderCache",
    "SourceFrame",
    "check_consistent",
    "frames_of",
    "normal_of",
    "read_header",
    "read_image_header",
    "to_float",
]

# Dimensions that order frames within one stack, or that the named splits below already
# cover with a clearer label ("temporal position 2" rather than "dimension index 2"):
# they are left out of a frame's "dimension index" split key.
_SPATIAL_DIMENSION_POINTERS = frozenset(
    {
        Tag("ImagePositionPatient"),
        Tag("InStackPositionNumber"),
        Tag("SliceLocation"),
        Tag("TemporalPositionIndex"),
    }
)


@dataclass(frozen=True)
class SourceFrame:
    """One source plane: a single-frame instance or one frame of a multi-frame instance."""

    path: Path
    sop_instance_uid: str
    #: 1-based frame number in a multi-frame instance; ``None`` for a single-frame one.
    frame_number: int | None
    #: ImagePositionPatient (mm, LPS) of the frame's first pixel.
    position: tuple[float, float, float]
    #: Single-frame files: where the PixelData element starts in the file, as found when the
    #: header was read (so loading need not parse the header again); ``None`` when unknown.
    pixel_data_offset: int | None = None


@dataclass
class FrameHeader:
    """Everything stack building needs of one frame."""

    source: SourceFrame
    header: Dataset
    order: int
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    columns: int
    frame_of_reference_uid: str
    image_type: tuple[str, ...]
    instance_number: int
    #: Attributes that tell acquisitions at the same position apart, most specific first.
    splits: dict[str, Hashable]


def read_header(path: Path, *, stop_before_pixels: bool) -> Dataset:
    """Read one file tolerantly (no preamble needed).

    Raises
    ------
    SeriesError
        The bytes do not parse, or parse into something with neither SOPClassUID nor
        Modality (not a DICOM object); the message names the file.
    """
    try:
        # force=True: senders and spools are not always careful with the preamble.
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as exc:  # parsing arbitrary bytes fails in many ways (struct.error, ...)
        raise SeriesError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    # With force=True any bytes parse as some dataset; an image has at least these.
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise SeriesError(f"{path.name}: unreadable (not a DICOM image: no SOPClassUID, Modality)")
    return ds


def read_image_header(path: Path) -> tuple[Dataset, int | None]:
    """Read one file's header (no pixel data) and where its PixelData element starts.

    pydicom stops reading in front of the pixel data and leaves the file there: that
    position lets :func:`scp_node.dicom.volume.load_stack` read the pixels without parsing
    the header a second time.

    Returns
    -------
    tuple of (pydicom.dataset.Dataset, int or None)
        The header, as :func:`read_header` with ``stop_before_pixels=True``, and the file
        offset of the (7FE0,0010) element's tag; ``None`` when the file ends there.

    Raises
    ------
    SeriesError
        As :func:`read_header`.
    """
    try:
        with path.open("rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
            offset = handle.tell()
            at_end = not handle.read(1)
    except Exception as exc:  # parsing arbitrary bytes fails in many ways (struct.error, ...)
        raise SeriesError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise SeriesError(f"{path.name}: unreadable (not a DICOM image: no SOPClassUID, Modality)")
    return ds, None if at_end else offset


class HeaderCache:
    """Headers read ahead (while a study is still arriving), taken by the job that needs them.

    The worker reads the headers of the files arriving while it has nothing to do, so a
    job's series selection finds them parsed. An entry is used only while its file still
    has the size and modification time it was read with (a resent instance rewrites its
    file); it is handed out once (:meth:`take` removes it: a retried job reads again),
    and the least recently read entries go beyond ``max_entries``. Thread-safe.

    Parameters
    ----------
    max_entries : int
        Most headers held (>= 1).

    Raises
    ------
    ValueError
        ``max_entries`` < 1.
    """

    def __init__(self, max_entries: int = 20000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, tuple[tuple[int, int], Dataset, int | None]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def read_ahead(self, path: Path) -> Dataset | None:
        """Read ``path``'s header into the cache (unless held); None when unreadable."""
        with self._lock:
            held = self._entries.get(path)
        if held is not None:
            return held[1]
        try:
            stamp = _stamp(path)
            ds, offset = read_image_header(path)
        except (OSError, SeriesError):
            return None  # the job reads it again and says why
        if "Rows" in ds:
            # pydicom converts each element's raw bytes on first access: do it for the ones
            # stack building reads now, not in the job (which finds any fault again).
            with contextlib.suppress(SeriesError):
                frames_of(path, ds, 0, offset)
        with self._lock:
            self._entries[path] = (stamp, ds, offset)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return ds

    def take(self, path: Path) -> tuple[Dataset, int | None]:
        """The header of ``path`` and its pixel data offset, as :func:`read_image_header`:
        from the cache when read ahead and the file is unchanged, else read now.

        Raises
        ------
        SeriesError
            As :func:`read_image_header`.
        """
        with self._lock:
            held = self._entries.pop(path, None)
        if held is not None:
            try:
                if _stamp(path) == held[0]:
                    return held[1], held[2]
            except OSError:
                pass  # read_image_header says what is wrong with the file
        return read_image_header(path)


def _stamp(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def check_consistent(reference: tuple[Path, Dataset], path: Path, ds: Dataset) -> None:
    """Check that ``ds`` may share a stack with the ``(path, dataset)`` of ``reference``.

    Raises
    ------
    SeriesError
        Rows, Columns, SeriesInstanceUID or FrameOfReferenceUID is missing from ``ds`` or
        differs from the reference (the message names the attribute and both files).
    """
    reference_path, reference_ds = reference
    for keyword in ("Rows", "Columns", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if keyword not in ds or ds[keyword].value in (None, ""):
            raise SeriesError(f"{path.name}: {keyword} is missing")
        if str(ds[keyword].value) != str(reference_ds.get(keyword, "")):
            raise SeriesError(f"{path.name}: {keyword} differs from {reference_path.name}")


def frames_of(
    path: Path, ds: Dataset, start: int, pixel_data_offset: int | None = None
) -> list[FrameHeader]:
    """The frames of one image instance (its header ``ds``, read from ``path``).

    Parameters
    ----------
    path : Path
        Where ``ds`` was read from (for decoding later, and for messages).
    ds : pydicom.dataset.Dataset
        The instance's header (pixel data not needed).
    start : int
        Receive order of the first frame (ties between duplicates go to the later one).
    pixel_data_offset : int or None, optional
        Where the PixelData element starts in ``path`` (:func:`read_image_header`); kept
        in the frame of a single-frame image.

    Returns
    -------
    list of FrameHeader
        One per frame, in frame order.

    Raises
    ------
    SeriesError
        A UID is missing, the image is not grey scale, or a frame lacks position,
        orientation or pixel spacing (the message names the file and frame).
    """
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            raise SeriesError(f"{path.name}: {keyword} is missing")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(f"{path.name}: only single-sample (grey scale) images are supported")
    number_of_frames = _int(ds.get("NumberOfFrames")) or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    is_multi_frame = per_frame is not None or shared_groups is not None or number_of_frames > 1
    rows, columns = int(ds.Rows), int(ds.Columns)
    frame_of_reference_uid = str(ds.FrameOfReferenceUID)
    instance_number = _int(ds.get("InstanceNumber")) or 0
    if not is_multi_frame:
        missing = [
            keyword
            for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing")
            if not ds.get(keyword)
        ]
        if missing:
            raise SeriesError(f"{path.name}: missing geometry ({', '.join(missing)})")
        source = SourceFrame(
            path,
            str(ds.SOPInstanceUID),
            None,
            _position(_vector(ds.ImagePositionPatient, 3, path.name, "ImagePositionPatient")),
            pixel_data_offset,
        )
        splits: dict[str, Hashable] = {
            "temporal position": _int(ds.get("TemporalPositionIdentifier")),
            "echo": _values(ds.get("EchoNumbers")),
            "acquisition": _int(ds.get("AcquisitionNumber")),
        }
        return [
            FrameHeader(
                source=source,
                header=ds,
                order=start,
                orientation=_orientation(ds.ImageOrientationPatient, path.name),
                pixel_spacing=_vector(ds.PixelSpacing, 2, path.name, "PixelSpacing"),
                image_type=_image_type(ds.get("ImageType")),
                splits=splits,
                rows=rows,
                columns=columns,
                frame_of_reference_uid=frame_of_reference_uid,
                instance_number=instance_number,
            )
        ]
    if per_frame is None or len(per_frame) != number_of_frames:
        raise SeriesError(
            f"{path.name}: NumberOfFrames {number_of_frames} without one per-frame functional "
            "group per frame (no geometry per frame)"
        )
    shared = shared_groups[0] if shared_groups else Dataset()
    spatial_dimensions = _spatial_dimension_mask(ds)
    frames = []
    for index, item in enumerate(per_frame):
        where = f"{path.name} frame {index + 1}"

        def group(sequence: str, keyword: str, item: Dataset = item) -> Any:
            for holder in (item, shared):
                items = holder.get(sequence)
                if items and keyword in items[0]:
                    return items[0][keyword].value
            return None

        position = group("PlanePositionSequence", "ImagePositionPatient")
        orientation = group("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = group("PixelMeasuresSequence", "PixelSpacing")
        missing = [
            name
            for name, value in (
                ("ImagePositionPatient", position),
                ("ImageOrientationPatient", orientation),
                ("PixelSpacing", spacing),
            )
            if not value
        ]
        if missing:
            raise SeriesError(f"{where}: missing geometry ({', '.join(missing)})")
        dimension_values = _values(group("FrameContentSequence", "DimensionIndexValues"))
        if isinstance(dimension_values, tuple) and spatial_dimensions is not None:
            dimension_values = (
                tuple(
                    value
                    for value, spatial in zip(dimension_values, spatial_dimensions, strict=False)
                    if not spatial
                )
                or None
            )
        frame_type = group("CTImageFrameTypeSequence", "FrameType") or group(
            "MRImageFrameTypeSequence", "FrameType"
        )
        frames.append(
            FrameHeader(
                source=SourceFrame(
                    path,
                    str(ds.SOPInstanceUID),
                    index + 1,
                    _position(_vector(position, 3, where, "ImagePositionPatient")),
                ),
                header=ds,
                order=start + index,
                orientation=_orientation(orientation, where),
                pixel_spacing=_vector(spacing, 2, where, "PixelSpacing"),
                image_type=_image_type(frame_type or ds.get("ImageType")),
                splits={
                    "dimension index": dimension_values,
                    "temporal position": _int(
                        group("FrameContentSequence", "TemporalPositionIndex")
                    ),
                    "echo": to_float(group("MREchoSequence", "EffectiveEchoTime")),
                    "acquisition": _int(group("FrameContentSequence", "FrameAcquisitionNumber")),
                },
                rows=rows,
                columns=columns,
                frame_of_reference_uid=frame_of_reference_uid,
                instance_number=instance_number,
            )
        )
    return frames


def _spatial_dimension_mask(ds: Dataset) -> list[bool] | None:
    """For each dimension of the DimensionIndexSequence: whether it orders by position."""
    dimensions = ds.get("DimensionIndexSequence")
    if not dimensions:
        return None
    return [
        Tag(item.get("DimensionIndexPointer", 0)) in _SPATIAL_DIMENSION_POINTERS
        for item in dimensions
    ]


def _image_type(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.upper(),)
    return tuple(str(v).upper() for v in value)


def _values(value: Any) -> Hashable:
    if value is None or value == "":
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return (int(value),)
    return tuple(int(v) for v in value)


def _int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def to_float(value: Any) -> float | None:
    """``float(value)``, or ``None`` when absent or not a number."""
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _vector(value: Any, length: int, where: str, keyword: str) -> np.ndarray:
    try:
        vector = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{where}: {keyword} is not numeric") from exc
    if vector.shape != (length,) or not np.all(np.isfinite(vector)):
        raise SeriesError(f"{where}: {keyword} must hold {length} finite numbers")
    return vector


def _position(vector: np.ndarray) -> tuple[float, float, float]:
    return float(vector[0]), float(vector[1]), float(vector[2])


def _orientation(value: Any, where: str) -> np.ndarray:
    iop = _vector(value, 6, where, "ImageOrientationPatient")
    row, column = iop[:3], iop[3:]
    if not (
        math.isclose(float(np.linalg.norm(row)), 1.0, abs_tol=1e-2)
        and math.isclose(float(np.linalg.norm(column)), 1.0, abs_tol=1e-2)
        and abs(float(np.dot(row, column))) < 1e-2
    ):
        raise SeriesError(f"{where}: ImageOrientationPatient is not two orthonormal vectors")
    return iop


def normal_of(iop: np.ndarray) -> np.ndarray:
    """Unit slice normal (row cosine x column cosine) of an ImageOrientationPatient."""
    normal = np.cross(iop[:3], iop[3:])
    return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)
