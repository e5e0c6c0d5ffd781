"""Checks on an instance's bytes before the node accepts it.

pydicom reads damaged data tolerantly (a truncated value is silently shortened), so parsing
alone proves little. What we check is what the worker will need: the identifying UIDs, the
image attributes, and pixel data whose length (native) or fragment structure
(encapsulated) is intact.

Only the header is parsed (up to the pixel data), and only the elements the node reads
(:data:`CHECKED_KEYWORDS`) are converted to values; every other element is checked only for
a length that fits the data. The pixel data element is then checked where it lies in the
bytes: its declared length against the image attributes and the bytes present (native), or
its item structure (encapsulated). The pixel data is neither copied nor decoded
(measured: about the same CPU as reading it whole, ~1.1 ms for a 512x512 CT slice, since
reading it is one copy; most of the time is the header).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from scp_node.dicom.status import Status
from scp_node.dicom.uids import is_valid_uid
from scp_node.queue.records import InstanceRecord

_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
#: Explicit VRs whose length field has 4 bytes (after 2 reserved ones).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

#: Elements converted (so that damage in them refuses the instance): what intake records,
#: what the worker reads to build a volume and a SEG on it. Sequences among them are parsed
#: whole (an enhanced image's functional groups hold its geometry).
CHECKED_KEYWORDS: frozenset[str] = frozenset(
    {
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "Modality",
        "StudyDate",
        "SeriesNumber",
        "SeriesDescription",
        "BodyPartExamined",
        "ImageType",
        "InstanceNumber",
        "AcquisitionNumber",
        "EchoNumbers",
        "TemporalPositionIdentifier",
        "SliceThickness",
        "SliceLocation",
        "SpacingBetweenSlices",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
        "DimensionIndexSequence",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
    }
)
_CHECKED_TAGS = frozenset(int(tag_for_keyword(kw) or 0) for kw in CHECKED_KEYWORDS)
_IMAGE_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")


class InstanceRejectedError(ValueError):
    """An instance is refused: ``status`` is the DIMSE status, the message the reason."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceHeader:
    """What the node records about an accepted instance (no patient data)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    study_date: str | None
    body_part_examined: str | None = None
    slice_thickness_mm: float | None = None
    orientation: tuple[float, ...] | None = None
    frame_count: int = 1

    def record(
        self,
        *,
        sop_class_uid: str,
        transfer_syntax_uid: str,
        path: str,
        size_bytes: int,
        calling_ae: str,
    ) -> InstanceRecord:
        """The job table's row for this instance, spooled at ``path``."""
        return InstanceRecord(
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            sop_instance_uid=self.sop_instance_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            modality=self.modality,
            path=path,
            size_bytes=size_bytes,
            calling_ae=calling_ae,
            series_number=self.series_number,
            series_description=self.series_description,
            study_date=self.study_date,
            body_part_examined=self.body_part_examined,
            slice_thickness_mm=self.slice_thickness_mm,
            orientation=self.orientation,
            frame_count=self.frame_count,
        )


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient, from the top level or (enhanced multi-frame) the shared
    functional groups; None when absent or malformed."""
    value = ds.get("ImageOrientationPatient")
    if value is None:
        try:
            value = (
                ds.SharedFunctionalGroupsSequence[0]
                .PlaneOrientationSequence[0]
                .get("ImageOrientationPatient")
            )
        except (AttributeError, IndexError):
            value = None
    try:
        cosines = tuple(float(v) for v in value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return cosines if cosines is not None and len(cosines) == 6 else None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return None if value in (None, "") else str(value)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class _PixelData:
    """Where the pixel data lies: its value's bytes (native) or its fragments' lengths."""

    encapsulated: bool
    value: memoryview
    fragment_lengths: tuple[int, ...] = ()


def _encapsulated_items(value: memoryview) -> tuple[int, ...]:
    """The item lengths of encapsulated pixel data (Basic Offset Table first) up to its
    sequence delimiter; ValueError when an item is malformed, runs past the end of the
    data, or the delimiter is missing."""
    lengths: list[int] = []
    at = 0
    while at + 8 <= len(value):
        group, element, length = struct.unpack_from("<HHL", value, at)
        tag = group << 16 | element
        at += 8
        if tag == _SEQUENCE_DELIMITER:
            return tuple(lengths)
        if tag != _ITEM:
            raise ValueError(f"unexpected tag ({group:04X},{element:04X}) among the items")
        if length == _UNDEFINED_LENGTH or at + length > len(value):
            raise ValueError("an item runs past the end of the data (truncated or bad length)")
        lengths.append(length)
        at += length
    raise ValueError("no sequence delimiter (truncated)")


def _pixel_data_at(data: bytes, offset: int, implicit_vr: bool) -> _PixelData | None:
    """The pixel data element starting at ``offset`` of ``data`` (where a header-only
    parse stopped), or None when the data set ends before any pixel data."""
    view = memoryview(data)
    if offset + 8 > len(view):
        return None
    group, element = struct.unpack_from("<HH", view, offset)
    if (group, element) != (0x7FE0, 0x0010):
        # Float or double float pixel data: not an image the node accepts.
        return None
    if implicit_vr:
        (length,) = struct.unpack_from("<L", view, offset + 4)
        start = offset + 8
    elif bytes(view[offset + 4 : offset + 6]) in _LONG_VRS:
        if offset + 12 > len(view):
            raise ValueError("the pixel data element is truncated")
        (length,) = struct.unpack_from("<L", view, offset + 8)
        start = offset + 12
    else:
        (length,) = struct.unpack_from("<H", view, offset + 6)
        start = offset + 8
    if length == _UNDEFINED_LENGTH:
        rest = view[start:]
        return _PixelData(True, rest, _encapsulated_items(rest))
    if start + length > len(view):
        raise ValueError(
            f"pixel data declares {length} bytes but {len(view) - start} are present "
            "(truncated or bad length)"
        )
    return _PixelData(False, view[start : start + length])


def _pixel_data_of(ds: Dataset) -> _PixelData | None:
    """The pixel data of a data set read whole (a deflated one: its bytes are compressed)."""
    if "PixelData" not in ds:
        return None
    value = memoryview(ds.PixelData)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        items = bytes(value) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        return _PixelData(True, value, _encapsulated_items(memoryview(items)))
    return _PixelData(False, value)


def _check_pixel_data(ds: Dataset, pixels: _PixelData | None) -> None:
    missing = [kw for kw in _IMAGE_ATTRIBUTES if kw not in ds]
    if missing or pixels is None:
        what = ", ".join([*missing, *([] if pixels is not None else ["PixelData"])])
        raise InstanceRejectedError(
            Status.DATASET_DOES_NOT_MATCH, f"image attributes missing: {what}"
        )
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
    except (TypeError, ValueError) as exc:
        # A wrong VR (e.g. Rows sent as UI) reads as text or bytes, not a number.
        raise InstanceRejectedError(
            Status.CANNOT_UNDERSTAND, f"image attributes are not numbers: {exc}"
        ) from exc
    if rows == 0 or columns == 0:
        raise InstanceRejectedError(Status.DATASET_DOES_NOT_MATCH, "image has zero rows or columns")
    if pixels.encapsulated:
        # The first item is the Basic Offset Table (may be empty); frames follow.
        if not any(pixels.fragment_lengths[1:]):
            raise InstanceRejectedError(
                Status.CANNOT_UNDERSTAND, "encapsulated pixel data is empty"
            )
        return
    if not len(pixels.value):
        raise InstanceRejectedError(Status.DATASET_DOES_NOT_MATCH, "pixel data is empty")
    frames = _int(ds, "NumberOfFrames") or 1
    expected = rows * columns * samples * frames * bits // 8
    # Native pixel data is padded to an even length.
    if len(pixels.value) not in (expected, expected + 1):
        raise InstanceRejectedError(
            Status.CANNOT_UNDERSTAND,
            f"pixel data has {len(pixels.value)} bytes, the image attributes need {expected}",
        )


def _check_lengths(ds: Dataset) -> None:
    # pydicom reads an element whose declared length runs past the end of the data (a
    # truncated transfer, or a huge length field) with what is there; the bytes are corrupt.
    for tag, raw in ds.items():  # the raw elements, before any value conversion
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        present = len(raw.value) if raw.value is not None else 0
        if present != raw.length:
            raise InstanceRejectedError(
                Status.CANNOT_UNDERSTAND,
                f"element {tag} declares {raw.length} bytes but {present} are present "
                "(truncated or bad length)",
            )


def check_instance(data: bytes, affected_sop_instance_uid: str) -> InstanceHeader:
    """Parse ``data`` (a DICOM file's bytes) and check it can be accepted.

    Raises
    ------
    InstanceRejectedError
        With ``CANNOT_UNDERSTAND`` when the bytes do not parse or the pixel data is damaged,
        ``DATASET_DOES_NOT_MATCH`` when identifying UIDs or image attributes are missing or
        invalid.
    """
    buffer = io.BytesIO(data)
    try:
        ds = dcmread(buffer, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
            # Where the pixel data lies is known only once the whole data set is inflated.
            ds = dcmread(io.BytesIO(data))
            pixels = _pixel_data_of(ds)
        else:
            pixels = _pixel_data_at(
                data, buffer.tell(), ds.file_meta.TransferSyntaxUID.is_implicit_VR
            )
        _check_lengths(ds)
        for tag in _CHECKED_TAGS.intersection(ds.keys()):  # damage in what we read surfaces here
            _ = ds[tag].value
    except Exception as exc:
        raise InstanceRejectedError(
            Status.CANNOT_UNDERSTAND, f"cannot parse data set: {type(exc).__name__}: {exc}"
        ) from exc

    uids = {kw: _text(ds, kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    problems = [
        f"{kw} missing or not a valid UID" for kw, uid in uids.items() if not is_valid_uid(uid)
    ]
    if not problems and uids["SOPInstanceUID"] != affected_sop_instance_uid:
        problems.append("SOPInstanceUID differs from the command's AffectedSOPInstanceUID")
    if problems:
        raise InstanceRejectedError(Status.DATASET_DOES_NOT_MATCH, "; ".join(problems))
    _check_pixel_data(ds, pixels)
    return InstanceHeader(
        study_instance_uid=str(uids["StudyInstanceUID"]),
        series_instance_uid=str(uids["SeriesInstanceUID"]),
        sop_instance_uid=str(uids["SOPInstanceUID"]),
        modality=_text(ds, "Modality"),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription"),
        study_date=_text(ds, "StudyDate"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        slice_thickness_mm=_float(ds, "SliceThickness"),
        orientation=_orientation(ds),
        frame_count=_int(ds, "NumberOfFrames") or 1,
    )
