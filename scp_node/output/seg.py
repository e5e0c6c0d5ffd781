"""Label map + source series + model card -> a DICOM Segmentation (BINARY or LABELMAP SEG).

The SEG lies exactly on the source images: one frame per source slice per segment, each
frame with its source slice's ImagePositionPatient, the source orientation, rows,
columns, pixel spacing and frame of reference. Its UIDs follow
:func:`scp_node.output.uids.output_uids`: one Series Instance UID per (source series, model
name, model version), and a SOP Instance UID that also depends on the set of source
instances, so a retry on unchanged input rewrites the same SEG while a series that grew
gets a new instance (with a higher InstanceNumber from the caller) in the same series.

BINARY (the default, readable by every SEG viewer) stores one bit per pixel per segment,
uncompressed; LABELMAP (Label Map Segmentation Storage, highdicom's ``LABELMAP`` type) one
segment number per pixel, JPEG-LS lossless. For a 1000-slice 512 x 512 CT with one organ
that is 32 MiB (BINARY) against about 1.3 MiB (LABELMAP); uncompressed, a LABELMAP would be
eight times the BINARY. The label map is handed to highdicom as it is (or as one uint8
copy when its values are not the segment numbers), never as floats or per-label masks of
the whole volume.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from scp_node.dicom.volume import SourceVolume
from scp_node.durable import write_durably
from scp_node.errors import SegmentationError
from scp_node.inference.registry import CodeSpec, LabelSpec, ModelSpec
from scp_node.output.uids import output_uids

__all__ = [
    "MANUFACTURER",
    "SEG_TYPES",
    "build_segmentation",
    "content_label_for",
    "write_segmentation",
]

logger = logging.getLogger(__name__)

#: Manufacturer and DeviceSerialNumber of every SEG the node writes.
MANUFACTURER = "scp-node"

#: The segmentation types a SEG can be built as, and the transfer syntax each is written in.
SEG_TYPES: dict[hd.seg.SegmentationTypeValues, str] = {
    hd.seg.SegmentationTypeValues.BINARY: ExplicitVRLittleEndian,
    hd.seg.SegmentationTypeValues.LABELMAP: JPEGLSLossless,
}
#: Slices per step when scanning a label map: bounds the temporaries to a few MiB.
_CHUNK_SLICES = 16

_CS_INVALID = re.compile(r"[^A-Z0-9 _]")
_CS_MAX_LENGTH = 16


def content_label_for(model_name: str) -> str:
    """ContentLabel (a valid CS, at most 16 characters) derived from a model name.

    Upper case; characters other than ``A-Z``, ``0-9``, space and ``_`` become ``_``; no
    trailing space or ``_`` (a CS value may not end with either).
    """
    label = _CS_INVALID.sub("_", model_name.upper())[:_CS_MAX_LENGTH].strip(" _")
    return label or "SEGMENTATION"


def build_segmentation(
    volume: SourceVolume,
    labelmap: np.ndarray,
    spec: ModelSpec,
    *,
    software_version: str,
    series_number: int = 9901,
    instance_number: int = 1,
    seg_type: hd.seg.SegmentationTypeValues | str = hd.seg.SegmentationTypeValues.BINARY,
) -> hd.seg.Segmentation | None:
    """Build a BINARY (or LABELMAP) SEG of ``labelmap`` on the geometry of ``volume``.

    One segment per label of ``spec`` that has at least one voxel, numbered 1..n in the
    card's label order (segment label = label name, category/type codes and display
    colour from the card, algorithm type AUTOMATIC identified by model name and version).
    Labels without a voxel are left out. Every segment has exactly one frame per source
    slice (empty frames kept), placed at that slice's ImagePositionPatient; every source
    instance is referenced. A multi-frame source is referenced frame by frame: each SEG
    frame's Derivation Image Sequence names the source instance and the one frame of the
    segmented stack it lies on (never a frame of another phase at the same position).

    Parameters
    ----------
    volume : SourceVolume
        The source stack; ``volume.frames[i]`` is the source plane of ``labelmap[i]``.
    labelmap : numpy.ndarray
        Shape ``(slices, rows, columns)`` equal to ``volume.array.shape``, any integer
        (or bool) dtype, in the same axis order as ``volume.array``. Values are 0
        (background) or a ``LabelSpec.value`` of ``spec``.
    spec : ModelSpec
        The model card: name, version, series description, labels.
    software_version : str
        The node's version, written as SoftwareVersions.
    series_number : int, optional
        SeriesNumber of the SEG.
    instance_number : int, optional
        InstanceNumber of the SEG (>= 1): the caller numbers the successive SEGs of one
        series 1, 2, ... so viewers show the newest first. ContentDate and ContentTime
        are the time of the build (UTC).
    seg_type : highdicom.seg.SegmentationTypeValues or str, optional
        ``BINARY`` (default: uncompressed, every SEG viewer reads it) or ``LABELMAP``
        (``"binary"`` / ``"labelmap"`` in any case): one frame per source slice holding
        every segment (Label Map Segmentation Storage, JPEG-LS lossless, far smaller) for
        receivers that read it (see :data:`SEG_TYPES`). It is another instance of the same
        SEG series (``output_uids(..., variant="labelmap")``), same segments and numbers.

    Returns
    -------
    highdicom.seg.Segmentation or None
        The SEG, or ``None`` when no label has any voxel: the caller records "no
        findings" and sends nothing.

    Raises
    ------
    SegmentationError
        ``labelmap`` has the wrong shape or dtype or values that are not labels of
        ``spec``, ``instance_number`` is below 1, ``seg_type`` is neither BINARY nor
        LABELMAP, or highdicom refused to build the SEG
        (the message says why).
    """
    expected_shape = tuple(volume.array.shape)
    if labelmap.shape != expected_shape:
        raise SegmentationError(
            f"labelmap has shape {labelmap.shape}, the volume {expected_shape} "
            "(slices, rows, columns)"
        )
    if not (np.issubdtype(labelmap.dtype, np.integer) or labelmap.dtype == np.bool_):
        raise SegmentationError(f"labelmap must hold integers, not {labelmap.dtype}")
    if instance_number < 1:
        raise SegmentationError(f"instance_number must be >= 1, got {instance_number}")

    segmentation_type = _seg_type(seg_type)
    labels, segments = _segments(labelmap, spec)
    if not labels:
        logger.info(
            "no label has any voxel; no SEG built",
            extra={"series_instance_uid": volume.series_instance_uid},
        )
        return None

    uids = output_uids(
        "seg",
        source_series_instance_uid=volume.series_instance_uid,
        model_name=spec.name,
        model_version=spec.version,
        source_sop_instance_uids=(str(ds.SOPInstanceUID) for ds in volume.datasets),
        variant=(
            None
            if segmentation_type is hd.seg.SegmentationTypeValues.BINARY
            else segmentation_type.value.lower()
        ),
    )
    series_instance_uid, sop_instance_uid = uids.series_instance_uid, uids.sop_instance_uid
    algorithm = hd.AlgorithmIdentificationSequence(
        name=spec.name,
        version=spec.version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    content = datetime.now(UTC)
    started = time.perf_counter()
    try:
        descriptions = [
            _segment_description(number, label, algorithm)
            for number, label in enumerate(labels, start=1)
        ]
        seg = hd.seg.Segmentation(
            source_images=list(volume.datasets),
            pixel_array=segments,
            plane_positions=_plane_positions(volume),
            segmentation_type=segmentation_type,
            transfer_syntax_uid=SEG_TYPES[segmentation_type],
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            content_date=content.date(),
            content_time=content.time(),
            manufacturer=MANUFACTURER,
            manufacturer_model_name=spec.name,
            software_versions=software_version,
            device_serial_number=MANUFACTURER,
            series_description=spec.series_description,
            content_label=content_label_for(spec.name),
            content_description=f"{spec.name} {spec.version}"[:64],
            omit_empty_frames=False,
        )
        if volume.stack.is_multi_frame:
            _reference_stack_frames_only(seg, volume)
    except Exception as exc:  # highdicom raises ValueError, TypeError, AttributeError, ...
        raise SegmentationError(
            f"cannot build SEG of model {spec.name} {spec.version}: {exc}"
        ) from exc
    elapsed_s = time.perf_counter() - started
    logger.info(
        "%s SEG built: %d segment(s), %d frame(s) in %.3f s",
        segmentation_type.value,
        len(labels),
        int(seg.NumberOfFrames),
        elapsed_s,
        extra={
            "series_instance_uid": volume.series_instance_uid,
            "seg_series_instance_uid": series_instance_uid,
            "seg_sop_instance_uid": sop_instance_uid,
        },
    )
    return seg


def _seg_type(value: hd.seg.SegmentationTypeValues | str) -> hd.seg.SegmentationTypeValues:
    name = value.value if isinstance(value, hd.seg.SegmentationTypeValues) else str(value).upper()
    for kind in SEG_TYPES:
        if kind.value == name:
            return kind
    raise SegmentationError(f"seg_type must be BINARY or LABELMAP, got {value!r}")


def _segments(labelmap: np.ndarray, spec: ModelSpec) -> tuple[list[LabelSpec], np.ndarray]:
    """The card's labels present in ``labelmap`` and its pixels as segment numbers.

    Segment numbers run 1..n in card order over the labels present. When the label values
    already are those numbers (one label of value 1, the usual case) ``labelmap`` itself is
    returned, else one uint8 (uint16) copy; scans go ``_CHUNK_SLICES`` slices at a time.

    Raises
    ------
    SegmentationError
        ``labelmap`` holds values that are not labels of ``spec``.
    """
    known = sorted({0, *(label.value for label in spec.labels)})
    present: set[int] = set()
    for start in range(0, labelmap.shape[0], _CHUNK_SLICES):
        chunk = labelmap[start : start + _CHUNK_SLICES]
        counted = 0
        for value in known:
            count = int(np.count_nonzero(chunk == value))
            if count:
                present.add(value)
                counted += count
        if counted != chunk.size:
            unknown = [int(v) for v in np.setdiff1d(np.unique(chunk), known)[:10]]
            raise SegmentationError(
                f"labelmap holds values {unknown} that are not labels of model {spec.name} "
                f"(known: {known[1:]})"
            )
    labels = [label for label in spec.labels if label.value in present]
    if labelmap.dtype == np.bool_:
        labelmap = labelmap.view(np.uint8)
    if labelmap.dtype in (np.uint8, np.uint16) and all(
        label.value == number for number, label in enumerate(labels, start=1)
    ):
        return labels, labelmap
    segments = np.zeros(labelmap.shape, dtype=np.uint8 if len(labels) < 256 else np.uint16)
    for start in range(0, labelmap.shape[0], _CHUNK_SLICES):
        chunk = labelmap[start : start + _CHUNK_SLICES]
        out = segments[start : start + _CHUNK_SLICES]
        for number, label in enumerate(labels, start=1):
            out[chunk == label.value] = number
    return labels, segments


def _plane_positions(volume: SourceVolume) -> list[hd.PlanePositionSequence] | None:
    """Positions of a multi-frame stack's frames; ``None``: one source file per slice.

    highdicom pairs ``pixel_array[i]`` with ``source_images[i]`` for single-frame sources.
    A multi-frame stack is sorted along the normal (not in frame order) and may be one of
    several stacks in its instance, so its frames are placed by position and highdicom
    matches each to the source frames at that position.
    """
    if not volume.stack.is_multi_frame:
        return None
    return [
        hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, frame.position)
        for frame in volume.frames
    ]


def _reference_stack_frames_only(seg: hd.seg.Segmentation, volume: SourceVolume) -> None:
    """Keep in each frame's derivation only source frames of the segmented stack.

    highdicom references every source frame at a frame's position; in an instance holding
    two phases that is one frame of each, but only one of them was segmented.
    """
    wanted = {
        (frame.sop_instance_uid, frame.frame_number)
        for frame in volume.frames
        if frame.frame_number is not None
    }
    for item in seg.PerFrameFunctionalGroupsSequence:
        for derivation in item.get("DerivationImageSequence", []):
            sources = derivation.SourceImageSequence
            kept = [
                source
                for source in sources
                if (
                    str(source.ReferencedSOPInstanceUID),
                    int(source.get("ReferencedFrameNumber", 0) or 0),
                )
                in wanted
            ]
            if len(kept) != len(sources):
                if not kept:
                    raise SegmentationError("a SEG frame lies on no frame of the source stack")
                derivation.SourceImageSequence = kept


def _coded(code: CodeSpec) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.code, scheme_designator=code.scheme, meaning=code.meaning)


def _segment_description(
    number: int, label: LabelSpec, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label.name,
        segmented_property_category=_coded(label.category),
        segmented_property_type=_coded(label.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*label.color),
    )
    if label.modifier is not None:
        # Laterality (left/right kidney, ...): highdicom's constructor has no argument for
        # it; the modifier lives inside the property type item (C.8.20.2).
        description.SegmentedPropertyTypeCodeSequence[
            0
        ].SegmentedPropertyTypeModifierCodeSequence = [_coded(label.modifier)]
    return description


def write_segmentation(seg: hd.seg.Segmentation, path: Path) -> None:
    """Write ``seg`` durably to ``path``.

    Through :func:`scp_node.durable.write_durably` (``<name>.part``, fsync, rename, fsync
    the directory), so after a crash ``path`` is either absent or complete. The parent
    directory must exist.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        As returned by :func:`build_segmentation`.
    path : Path
        Destination file.

    Raises
    ------
    SegmentationError
        The file cannot be written (the message names the path); no ``.part`` is left.
    """
    try:
        write_durably(path, lambda handle: seg.save_as(handle, enforce_file_format=True))
    except (OSError, ValueError) as exc:
        raise SegmentationError(f"cannot write SEG to {path}: {exc}") from exc
    logger.info(
        "SEG written",
        extra={"sop_instance_uid": str(seg.SOPInstanceUID)},
    )
