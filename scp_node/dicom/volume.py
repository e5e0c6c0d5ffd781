"""Series and multi-frame images -> stacks of parallel frames -> a volume on the source grid.

Two steps, both plain functions of files on disk:

* :func:`read_stacks` reads headers only. Every frame (a single-frame file, or one frame of
  an Enhanced / Legacy Converted Enhanced CT or MR object, from its per-frame functional
  groups) gets its position, orientation and pixel spacing; a series is split into
  :class:`Stack` records: localizers and derived images apart, and several acquisitions,
  echoes or phases at the same positions (told apart by the multi-frame dimension index,
  temporal position, echo or acquisition number) apart. Each stack says what is irregular
  about it (missing slices, uneven spacing, a gantry tilt) and, when it cannot be
  segmented honestly at all (mixed orientations, frames without geometry), why not.
  :mod:`scp_node.dicom.selection` then picks one.
* :func:`load_stack` decodes one stack's frames straight into one preallocated array
  (int16 when the rescaled values are whole numbers that fit, else float32; JPEG 2000
  through pylibjpeg; multi-frame frames one at a time through highdicom) and returns a
  :class:`SourceVolume`: the array plus the headers the SEG needs. Uncompressed
  single-frame files are parsed once: :func:`read_stacks` notes where each file's pixel
  data starts, and loading reads the pixels from there.

Spacing regularity and the volume geometry (affine) come from highdicom
(:func:`highdicom.spatial.get_volume_positions`, :class:`highdicom.VolumeGeometry`).
Reading is tolerant; anything that would put voxels in the wrong place is refused with a
:class:`~scp_node.errors.SeriesError` (or a stack's ``refusal``) that names the file and
the attribute.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.spatial import get_volume_positions
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.pixels.utils import pixel_array as decode_pixel_array
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scp_node.dicom.frames import (
    FrameHeader,
    HeaderCache,
    SourceFrame,
    check_consistent,
    frames_of,
    normal_of,
    read_header,
    read_image_header,
    to_float,
)
from scp_node.errors import SeriesError

__all__ = [
    "SourceFrame",
    "SourceVolume",
    "Stack",
    "describe",
    "load_stack",
    "load_volume",
    "read_series",
    "read_stacks",
]

logger = logging.getLogger(__name__)

#: Positions along the slice normal closer than this (mm) are the same slice.
POSITION_TOLERANCE_MM = 1e-3
#: Largest relative deviation of one gap from the nominal spacing still called regular.
MAX_SPACING_DEVIATION = 0.10
#: Tolerance for comparing direction cosines and pixel spacings between frames.
GEOMETRY_TOLERANCE = 1e-4
#: Stacking direction this far (degrees) off the slice normal is a sheared (tilted) grid.
SHEAR_TOLERANCE_DEG = 0.5
#: Uncompressed syntaxes whose pixels :func:`load_stack` reads straight from the file.
_NATIVE_LITTLE_ENDIAN = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_PIXEL_DATA = Tag("PixelData")


@dataclass(frozen=True)
class Stack:
    """Header-only description of parallel frames that can be segmented together.

    ``frames`` and ``headers`` run in increasing position along the slice normal (cross
    product of the row and column direction cosines). ``headers`` holds the source
    instances without pixel data: one per frame for single-frame images, the one instance
    of a multi-frame image.
    """

    series_instance_uid: str
    #: Empty for the series as a whole; else what tells this stack apart in its series.
    label: str
    modality: str
    frame_of_reference_uid: str
    image_type: tuple[str, ...]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    frames: tuple[SourceFrame, ...]
    headers: tuple[Dataset, ...]
    #: Nominal distance between neighbouring slices along the slice normal (mm).
    spacing_mm: float
    #: Angle between the slice normal and the patient z axis (degrees).
    tilt_deg: float = 0.0
    #: What is irregular but still segmentable, one sentence each.
    irregularities: tuple[str, ...] = ()
    #: Why the stack cannot be segmented honestly; ``None`` when it can.
    refusal: str | None = None
    #: Regular unsheared stacks only: the grid as a highdicom volume geometry.
    geometry: hd.VolumeGeometry | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """The Series Instance UID, plus the label when the series holds several stacks."""
        return (
            f"{self.series_instance_uid} ({self.label})" if self.label else self.series_instance_uid
        )

    @property
    def slices(self) -> int:
        return len(self.frames)

    @property
    def is_multi_frame(self) -> bool:
        return any(frame.frame_number is not None for frame in self.frames)

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def is_derived(self) -> bool:
        kinds = [value.upper() for value in self.image_type[:2]]
        return "DERIVED" in kinds or "SECONDARY" in kinds


@dataclass(frozen=True)
class SourceVolume:
    """A stack as one 3-D array on the source image grid.

    Attributes
    ----------
    array : numpy.ndarray
        Shape ``(slices, rows, columns)``, the rescale of each frame applied (Hounsfield
        units for CT): ``int16`` when every value is a whole number that fits (most CT),
        else ``float32``. Axis 0 follows :attr:`frames` (increasing
        position along the slice normal), axis 1 the column direction cosine (down the
        rows), axis 2 the row direction cosine, exactly as the pixels are stored.
    spacing_zyx : tuple of float
        ``(slice, row, column)`` spacing in mm: the nominal distance between slice centres
        along the normal, PixelSpacing[0], PixelSpacing[1].
    stack : Stack
        The headers: ``stack.frames[i]`` is the source plane of ``array[i]``.
    """

    array: np.ndarray
    spacing_zyx: tuple[float, float, float]
    stack: Stack

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        slices, rows, columns = self.array.shape
        return int(slices), int(rows), int(columns)

    def without_pixels(self) -> SourceVolume:
        """This volume with a placeholder array of the same shape and dtype (no memory).

        For the stages after inference, which need the geometry and headers only: dropping
        the last reference to the original frees its pixels before the SEG is built.
        """
        placeholder = np.broadcast_to(np.zeros((), dtype=self.array.dtype), self.array.shape)
        return SourceVolume(array=placeholder, spacing_zyx=self.spacing_zyx, stack=self.stack)

    @property
    def datasets(self) -> tuple[Dataset, ...]:
        """Source instances without pixel data (one per slice for single-frame images)."""
        return self.stack.headers

    @property
    def frames(self) -> tuple[SourceFrame, ...]:
        return self.stack.frames

    @property
    def series_instance_uid(self) -> str:
        return self.stack.series_instance_uid

    @property
    def frame_of_reference_uid(self) -> str:
        return self.stack.frame_of_reference_uid

    @property
    def modality(self) -> str:
        return self.stack.modality

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.stack.irregularities


def read_stacks(
    series_files: Mapping[str, Sequence[Path]], headers: HeaderCache | None = None
) -> dict[str, list[Stack] | str]:
    """Headers of every series of a study, split into stacks.

    Parameters
    ----------
    series_files : Mapping of str to Sequence of Path
        Series Instance UID -> the files received for it.
    headers : HeaderCache or None
        Headers read ahead; the others are read from the files.

    Returns
    -------
    dict of str to (list of Stack or str)
        Series Instance UID -> its stacks, or why the series could not be read at all
        (an unreadable file, no image in it, frames that disagree on rows, columns or
        frame of reference: the message names the file and the attribute).
    """
    result: dict[str, list[Stack] | str] = {}
    for uid in sorted(series_files):
        try:
            result[uid] = read_series(series_files[uid], headers)
        except SeriesError as exc:
            result[uid] = str(exc)
            logger.info("series not usable: %s", exc, extra={"series_instance_uid": uid})
    return result


def read_series(paths: Sequence[Path], headers: HeaderCache | None = None) -> list[Stack]:
    """Read the headers of one series' files and split them into stacks.

    Parameters
    ----------
    paths : Sequence of Path
        The files of one series, in any order.
    headers : HeaderCache or None
        Headers read ahead (taken from it); the others are read from the files.

    Returns
    -------
    list of Stack
        At least one stack; localizers, derived images and acquisitions sharing slice
        positions are separate stacks. A stack that cannot be segmented honestly carries
        its ``refusal``.

    Raises
    ------
    SeriesError
        No files; a file is unreadable; no file is an image (non-image objects only); a
        file lacks SeriesInstanceUID or Rows/Columns; frames differ in Rows, Columns,
        FrameOfReferenceUID or SeriesInstanceUID (the message names the attribute and
        the file).
    """
    if not paths:
        raise SeriesError("no files to load")
    frames: list[FrameHeader] = []
    refusals: list[str] = []
    non_images = 0
    reference: tuple[Path, Dataset] | None = None
    for path in paths:
        ds, pixel_data_offset = read_image_header(path) if headers is None else headers.take(path)
        if "Rows" not in ds or "Columns" not in ds:
            non_images += 1
            continue
        if reference is None:
            reference = (path, ds)
        else:
            check_consistent(reference, path, ds)
        try:
            frames.extend(frames_of(path, ds, len(frames), pixel_data_offset))
        except SeriesError as exc:
            refusals.append(str(exc))
    if reference is None:
        raise SeriesError(f"no image in the series ({non_images} non-image object(s))")
    series_uid = str(reference[1].SeriesInstanceUID)
    modality = str(reference[1].get("Modality", "") or "")
    if refusals:
        return [_refused(series_uid, modality, "", refusals[0])]

    by_kind: dict[str, list[FrameHeader]] = defaultdict(list)
    for frame in frames:
        by_kind[_kind(frame.image_type)].append(frame)
    stacks: list[Stack] = []
    for kind in sorted(by_kind):
        label = "" if kind == "original" and len(by_kind) == 1 else kind
        for sub_label, group in _split_acquisitions(by_kind[kind]):
            full = ", ".join(part for part in (label, sub_label) if part)
            stacks.append(_make_stack(series_uid, modality, full, group))
    if non_images:
        logger.info(
            "%d non-image object(s) left out of the series",
            non_images,
            extra={"series_instance_uid": series_uid},
        )
    return stacks


def _refused(series_uid: str, modality: str, label: str, why: str) -> Stack:
    return Stack(
        series_instance_uid=series_uid,
        label=label,
        modality=modality,
        frame_of_reference_uid="",
        image_type=(),
        orientation=(),
        pixel_spacing=(0.0, 0.0),
        rows=0,
        columns=0,
        frames=(),
        headers=(),
        spacing_mm=math.nan,
        refusal=why,
    )


def _kind(image_type: tuple[str, ...]) -> str:
    if "LOCALIZER" in image_type:
        return "localizer"
    kinds = [value.upper() for value in image_type[:2]]
    if "DERIVED" in kinds or "SECONDARY" in kinds:
        return "derived"
    return "original"


def _split_acquisitions(frames: list[FrameHeader]) -> list[tuple[str, list[FrameHeader]]]:
    """Split frames that share positions by the first attribute that tells them apart.

    Only duplicated positions split a group: scanners number each slice of a step-and-shoot
    CT as its own acquisition, which is still one stack.
    """
    if not _has_duplicates(frames):
        return [("", frames)]
    for attribute in ("dimension index", "temporal position", "echo", "acquisition"):
        values = {frame.splits.get(attribute) for frame in frames}
        if len(values) < 2:
            continue
        groups: dict[Hashable, list[FrameHeader]] = defaultdict(list)
        for frame in frames:
            groups[frame.splits.get(attribute)].append(frame)
        if all(not _has_duplicates(group) for group in groups.values()):
            return [
                (f"{attribute} {_format(value)}", groups[value])
                for value in sorted(groups, key=_sort_key)
            ]
    return [("", frames)]


def _format(value: Hashable) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _sort_key(value: Hashable) -> tuple[int, str]:
    return (0 if value is None else 1, _format(value).zfill(12))


def _has_duplicates(frames: list[FrameHeader]) -> bool:
    if not frames:
        return False
    normal = normal_of(frames[0].orientation)
    distances = np.sort([float(np.dot(normal, f.source.position)) for f in frames])
    return bool(np.any(np.diff(distances) <= POSITION_TOLERANCE_MM))


def _make_stack(series_uid: str, modality: str, label: str, frames: list[FrameHeader]) -> Stack:
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=GEOMETRY_TOLERANCE):
            count = len({tuple(np.round(f.orientation, 3)) for f in frames})
            return _refused(
                series_uid,
                modality,
                label,
                f"mixed orientations in one stack: {count} different ImageOrientationPatient "
                f"({_where(frame)} differs from {_where(first)})",
            )
        if not np.allclose(frame.pixel_spacing, first.pixel_spacing, atol=GEOMETRY_TOLERANCE):
            return _refused(
                series_uid,
                modality,
                label,
                f"{_where(frame)}: PixelSpacing differs from {_where(first)}",
            )
    normal = normal_of(first.orientation)
    kept, dropped = _drop_duplicates(frames, normal)
    irregularities: list[str] = []
    if dropped:
        irregularities.append(
            f"{dropped} frame(s) repeat a slice position; kept the highest InstanceNumber"
        )
    distances = np.array([float(np.dot(normal, f.source.position)) for f in kept])
    spacing, spacing_notes = _spacing(distances, first.header)
    irregularities.extend(spacing_notes)
    shear = _shear_deg([f.source.position for f in kept], normal)
    if shear > SHEAR_TOLERANCE_DEG:
        irregularities.append(
            f"gantry tilt: slices stacked {shear:.1f} degrees off their normal (sheared "
            "grid); segmented slice by slice on the acquired grid"
        )
    orientation = tuple(float(v) for v in first.orientation)
    geometry = None
    if not spacing_notes and shear <= SHEAR_TOLERANCE_DEG:
        geometry = _geometry(kept, orientation, spacing)
    # One header per instance, in frame order (a multi-frame instance's frames share one).
    headers = list({id(frame.header): frame.header for frame in kept}.values())
    return Stack(
        series_instance_uid=series_uid,
        label=label,
        modality=modality,
        frame_of_reference_uid=first.frame_of_reference_uid,
        image_type=first.image_type,
        orientation=orientation,
        pixel_spacing=(float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
        rows=first.rows,
        columns=first.columns,
        frames=tuple(f.source for f in kept),
        headers=tuple(headers),
        spacing_mm=spacing,
        tilt_deg=math.degrees(math.acos(min(1.0, abs(float(normal[2]))))),
        irregularities=tuple(irregularities),
        geometry=geometry,
    )


def _geometry(
    frames: list[FrameHeader], orientation: tuple[float, ...], spacing: float
) -> hd.VolumeGeometry | None:
    """highdicom's own check that the frames form a regular volume, and its affine."""
    positions = [f.source.position for f in frames]
    regular_spacing, _ = get_volume_positions(
        positions, orientation, rtol=MAX_SPACING_DEVIATION, perpendicular_tol=1e-2
    )
    if regular_spacing is None:
        return None
    first = frames[0]
    return hd.VolumeGeometry.from_attributes(
        image_position=positions[0],
        image_orientation=orientation,
        rows=first.rows,
        columns=first.columns,
        pixel_spacing=[float(v) for v in first.pixel_spacing],
        spacing_between_slices=regular_spacing if len(frames) > 1 else spacing,
        number_of_frames=len(frames),
        frame_of_reference_uid=first.frame_of_reference_uid,
        coordinate_system="PATIENT",
    )


def _where(frame: FrameHeader) -> str:
    name = frame.source.path.name
    return (
        name if frame.source.frame_number is None else f"{name} frame {frame.source.frame_number}"
    )


def _drop_duplicates(
    frames: list[FrameHeader], normal: np.ndarray
) -> tuple[list[FrameHeader], int]:
    """One frame per position: the highest InstanceNumber, then the last received."""
    ordered = sorted(frames, key=lambda f: (float(np.dot(normal, f.source.position)), f.order))
    groups: list[list[FrameHeader]] = []
    for frame in ordered:
        distance = float(np.dot(normal, frame.source.position))
        if groups and distance - float(np.dot(normal, groups[-1][0].source.position)) <= (
            POSITION_TOLERANCE_MM
        ):
            groups[-1].append(frame)
        else:
            groups.append([frame])
    kept = [max(group, key=lambda f: (f.instance_number, f.order)) for group in groups]
    dropped = len(frames) - len(kept)
    if dropped:
        logger.warning(
            "%d frame(s) share a slice position with another; kept the highest InstanceNumber",
            dropped,
            extra={"sop_instance_uid": kept[0].source.sop_instance_uid},
        )
    return kept, dropped


def _spacing(distances: np.ndarray, first: Dataset) -> tuple[float, list[str]]:
    """Nominal slice spacing and what is irregular about the gaps (empty when nothing)."""
    if distances.size < 2:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = to_float(first.get(keyword))
            if value is not None and value > 0:
                return value, []
        return 1.0, []
    gaps = np.diff(distances)
    spacing = float(np.median(gaps))
    notes: list[str] = []
    # A missing slice leaves a gap close to a whole multiple of the spacing.
    multiples = np.round(gaps / spacing)
    missing = (multiples >= 2) & (
        np.abs(gaps - multiples * spacing) <= MAX_SPACING_DEVIATION * spacing
    )
    if missing.any():
        sizes = ", ".join(f"{gap:.1f}" for gap in gaps[missing])
        count = int(missing.sum())
        notes.append(
            f"{count} gap{'s' if count > 1 else ''} of {sizes} mm in a {spacing:.1f} mm series "
            f"({int((multiples[missing] - 1).sum())} slice(s) missing)"
        )
    uneven = ~missing & (np.abs(gaps - spacing) > MAX_SPACING_DEVIATION * spacing)
    if uneven.any():
        notes.append(
            f"uneven slice spacing: {int(uneven.sum())} gap(s) from {gaps[uneven].min():.2f} "
            f"to {gaps[uneven].max():.2f} mm in a {spacing:.2f} mm series"
        )
    return spacing, notes


def _shear_deg(positions: Sequence[tuple[float, float, float]], normal: np.ndarray) -> float:
    """Angle between the line through the first and last slice and the slice normal."""
    if len(positions) < 2:
        return 0.0
    step = np.subtract(positions[-1], positions[0])
    length = float(np.linalg.norm(step))
    if length == 0:
        return 0.0
    return math.degrees(math.acos(min(1.0, abs(float(np.dot(step, normal))) / length)))


# --- decoding ----------------------------------------------------------------------------


def load_stack(stack: Stack) -> SourceVolume:
    """Decode one stack's frames into one preallocated array, frame by frame.

    The array is ``int16`` while every frame's modality values (stored value x
    RescaleSlope + RescaleIntercept) are whole numbers that fit in it, as they are for
    nearly every CT (slope 1, integer intercept): half the memory of ``float32``, and the
    same values. A frame that does not fit (a fractional slope, MR scaled to floats) turns
    the array into ``float32`` once, and the remaining frames are written as floats.
    Decoded pixels are never kept in a dataset: each file is read, decoded into its place
    and dropped; only ``stack.headers`` (without pixel data) stay. An uncompressed
    (little-endian) single-frame file is not parsed again: its pixel data is read at the
    offset :func:`read_stacks` found, and decoded by pydicom with the header's options.

    Parameters
    ----------
    stack : Stack
        From :func:`read_series` / :func:`read_stacks`, without a ``refusal``.

    Returns
    -------
    SourceVolume
        ``array[i]`` holds ``stack.frames[i]`` with its RescaleSlope/Intercept applied
        (per frame for multi-frame images; slope 1 and intercept 0 when absent).

    Raises
    ------
    SeriesError
        The stack carries a refusal; a file cannot be read or decoded, or a frame decodes
        to another shape than Rows x Columns.
    """
    if stack.refusal is not None:
        raise SeriesError(stack.refusal)
    target = _Target((stack.slices, stack.rows, stack.columns))
    by_path: dict[Path, list[int]] = defaultdict(list)
    for index, frame in enumerate(stack.frames):
        by_path[frame.path].append(index)
    # Single-frame stacks keep one header per frame, in frame order.
    headers = stack.headers if len(stack.headers) == stack.slices else None
    for path, indices in by_path.items():
        if stack.frames[indices[0]].frame_number is None:
            for index in indices:
                frame = stack.frames[index]
                header = None if headers is None else headers[index]
                if header is not None and str(header.SOPInstanceUID) != frame.sop_instance_uid:
                    header = None
                _decode_single(
                    path, stack.rows, stack.columns, target, index, header, frame.pixel_data_offset
                )
        else:
            _decode_frames(path, [(i, stack.frames[i].frame_number or 0) for i in indices], target)
    volume = SourceVolume(
        array=target.array,
        spacing_zyx=(stack.spacing_mm, stack.pixel_spacing[0], stack.pixel_spacing[1]),
        stack=stack,
    )
    logger.info(
        "volume loaded: %d slices of %dx%d (%s), spacing %.3f/%.3f/%.3f mm",
        stack.slices,
        stack.rows,
        stack.columns,
        target.array.dtype,
        *volume.spacing_zyx,
        extra={"series_instance_uid": stack.series_instance_uid},
    )
    return volume


class _Target:
    """The preallocated volume frames are decoded into: int16 until a frame needs floats."""

    _LOW, _HIGH = np.iinfo(np.int16).min, np.iinfo(np.int16).max

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.array: np.ndarray = np.empty(shape, dtype=np.int16)

    def put_stored(
        self,
        index: int,
        pixels: np.ndarray,
        slope: float | None,
        intercept: float | None,
        stored_range: tuple[int, int] | None = None,
    ) -> None:
        """Write stored values ``pixels`` of frame ``index`` with their rescale applied.

        ``stored_range`` bounds the values ``pixels`` can hold (from BitsStored): when the
        rescaled bounds fit in int16, the pixels need not be scanned for their extremes.
        """
        slope = 1.0 if slope is None else slope
        intercept = intercept or 0.0
        if self.array.dtype == np.int16 and slope == 1.0 and float(intercept).is_integer():
            offset = int(intercept)
            if stored_range is not None and (
                stored_range[0] + offset >= self._LOW and stored_range[1] + offset <= self._HIGH
            ):
                # Every sum fits in int16, so int16 arithmetic (wrapping in between) is exact.
                np.add(pixels, offset, out=self.array[index], dtype=np.int16, casting="unsafe")
                return
            if pixels.size == 0 or (
                int(pixels.min()) + offset >= self._LOW and int(pixels.max()) + offset <= self._HIGH
            ):
                np.add(pixels, offset, out=self.array[index], dtype=np.int32, casting="unsafe")
                return
        frame = self._float_frame(index)
        frame[...] = pixels
        if slope != 1.0:
            frame *= np.float32(slope)
        if intercept:
            frame += np.float32(intercept)

    def put_values(self, index: int, values: np.ndarray) -> None:
        """Write frame ``index`` from float modality values (rescale already applied)."""
        if self.array.dtype == np.int16:
            whole = np.rint(values)
            if np.array_equal(whole, values) and (
                values.size == 0 or (whole.min() >= self._LOW and whole.max() <= self._HIGH)
            ):
                self.array[index] = whole
                return
        self._float_frame(index)[...] = values

    def _float_frame(self, index: int) -> np.ndarray:
        if self.array.dtype != np.float32:
            # Once per volume at most: the frames so far hold whole numbers, exact in float32.
            self.array = self.array.astype(np.float32)
        frame: np.ndarray = self.array[index]
        return frame


def load_volume(paths: Sequence[Path]) -> SourceVolume:
    """Read, check, sort and decode the files of one series (its largest stack).

    A convenience for callers that hold one series and no rules (evaluation, benchmarks,
    tests): :func:`read_series`, then :func:`load_stack` of the original stack with the
    most slices.

    Raises
    ------
    SeriesError
        As :func:`read_series` and :func:`load_stack`, or when every stack is refused (the
        message says why).
    """
    stacks = read_series(paths)
    usable = [s for s in stacks if s.refusal is None]
    if not usable:
        raise SeriesError(stacks[0].refusal or "no usable stack")
    best = min(usable, key=lambda s: (s.is_localizer, s.is_derived, -s.slices, s.label))
    return load_stack(best)


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


def _decode_single(
    path: Path,
    rows: int,
    columns: int,
    target: _Target,
    index: int,
    header: Dataset | None = None,
    pixel_data_offset: int | None = None,
) -> None:
    """Decode one single-frame file into ``target[index]``.

    With the ``header`` read at selection and the offset of its pixel data, uncompressed
    pixels are read from there (the header is not parsed again); otherwise, or when the
    file does not hold what the header said, the whole file is read and decoded.
    """
    if header is not None and pixel_data_offset is not None:
        native = _read_native_pixels(path, header, pixel_data_offset, rows, columns)
        if native is not None:
            pixels, stored_range = native
            target.put_stored(
                index,
                pixels,
                to_float(header.get("RescaleSlope")),
                to_float(header.get("RescaleIntercept")),
                stored_range,
            )
            return
    ds = read_header(path, stop_before_pixels=False)
    if "PixelData" not in ds:
        raise SeriesError(f"{path.name}: PixelData is missing")
    _ensure_transfer_syntax(ds)
    try:
        # The module function does not cache the decoded pixels on the dataset.
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
    target.put_stored(
        index, pixels, to_float(ds.get("RescaleSlope")), to_float(ds.get("RescaleIntercept"))
    )


def _read_native_pixels(
    path: Path, header: Dataset, offset: int, rows: int, columns: int
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Uncompressed little-endian pixels of a single-frame file, read from ``offset``.

    pydicom parses the element at ``offset`` (without reading its value) and decodes the
    value with the options of ``header``, exactly as it decodes a whole dataset (unused
    high bits cleared), so the result is the same array. Returns the pixels and the range
    their stored values can take (from BitsStored and PixelRepresentation), or ``None``
    when this path does not apply (compressed, big endian, deflated) or the file does not
    hold a whole PixelData element of the expected size there.
    """
    implicit_vr, little_endian = header.original_encoding
    syntax = getattr(header, "file_meta", FileMetaDataset()).get("TransferSyntaxUID")
    if syntax is None and implicit_vr is not None:
        syntax = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    if syntax not in _NATIVE_LITTLE_ENDIAN or implicit_vr is None or not little_endian:
        return None
    if implicit_vr != (syntax == ImplicitVRLittleEndian):
        return None
    try:
        options = as_pixel_options(header, pixel_keyword="PixelData")
        bits_stored = int(options["bits_stored"])
        signed = int(options["pixel_representation"]) == 1
        if (
            int(options["rows"]) != rows
            or int(options["columns"]) != columns
            or int(options.get("number_of_frames", 1) or 1) != 1
            or int(options["samples_per_pixel"]) != 1
            or not 0 < bits_stored <= int(options["bits_allocated"]) <= 16
        ):
            return None
        with path.open("rb") as handle:
            handle.seek(offset)
            element = next(data_element_generator(handle, implicit_vr, True, defer_size=0))
            if (
                not isinstance(element, RawDataElement)
                or element.tag != _PIXEL_DATA
                or element.value is not None  # read, not deferred: undefined length
            ):
                return None
            handle.seek(element.value_tell)
            value = handle.read(element.length)
        if len(value) != element.length:
            return None
        if element.VR:
            options["pixel_vr"] = element.VR
        pixels, _ = get_decoder(syntax).as_array(value, **options)
    except Exception:  # anything unexpected: decode the whole file instead
        logger.debug("pixel data not read at its offset", exc_info=True)
        return None
    if pixels.shape != (rows, columns):
        return None
    if signed:
        return pixels, (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1)
    return pixels, (0, (1 << bits_stored) - 1)


def _decode_frames(path: Path, targets: list[tuple[int, int]], target: _Target) -> None:
    """Decode frames of one multi-frame file one at a time into ``target``."""
    try:
        image = hd.imread(path, lazy_frame_retrieval=True)
    except Exception as exc:  # highdicom raises ValueError, AttributeError, ...
        raise SeriesError(f"{path.name}: unreadable multi-frame image: {exc}") from exc
    try:
        for index, frame_number in targets:
            target.put_values(
                index,
                image.get_frame(
                    frame_number,
                    dtype=np.float32,
                    apply_real_world_transform=False,
                    apply_modality_transform=None,
                    apply_voi_transform=False,
                    apply_presentation_lut=False,
                    apply_palette_color_lut=False,
                    apply_icc_profile=False,
                ),
            )
    except SeriesError:
        raise
    except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
        raise SeriesError(f"{path.name}: frame cannot be decoded: {exc}") from exc


def describe(stack: Stack) -> str:
    """Short text for the job's events: slices, spacing, source kind."""
    kind = "multi-frame" if stack.is_multi_frame else "single-frame"
    return f"{stack.name}: {stack.slices} {kind} slices, {stack.spacing_mm:.2f} mm apart"
