"""Label map + source stack + model card -> a Secondary Capture series with burned-in outlines.

For PACS and viewers that cannot display DICOM SEG: one RGB Secondary Capture image per
source slice that holds a segment, on the source pixel grid (same rows, columns, position,
orientation, pixel spacing and frame of reference), so it sorts and links with the source.
Each image is the source slice through the card's display window, every segment's outline
in the label's colour, a legend of the labels on that slice, and a banner that says the
image is an AI result not meant for primary diagnosis.

Single-frame Secondary Capture Image Storage rather than Multi-frame True Color SC: the
multi-frame IOD has no per-frame position, while one image per slice carries its own
ImagePositionPatient and references its own source slice, which viewers use to sort the
series beside the source and to link a slice to its overlay.

UIDs: the series is ``uids.series_instance_uid``; each image's SOP Instance UID derives
(UUID version 5, ``2.25.<int>``, as :mod:`scp_node.output.uids`) from
``uids.sop_instance_uid`` and the source plane (SOP Instance UID, frame number), so a retry
rebuilds the same UIDs and a changed source series (new ``uids``) new ones.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import UTC, datetime

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DA, DS, TM

from scp_node.dicom.volume import SourceFrame, SourceVolume
from scp_node.errors import OverlayError
from scp_node.inference.registry import LabelSpec, ModelSpec
from scp_node.output.drawing import auto_window, outline, to_display
from scp_node.output.preview import choose_slices
from scp_node.output.seg import MANUFACTURER
from scp_node.output.uids import OutputUids

__all__ = ["DISCLAIMER", "build_overlay_series"]

logger = logging.getLogger(__name__)

#: Burned into every overlay image.
DISCLAIMER = "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"

_TEXT = (255, 255, 255)
_BOX = (0, 0, 0)
#: Smallest font size (pixels) text shrinks to on narrow images.
_MIN_FONT_PX = 8

#: Patient axis letters (PS3.3 C.7.6.1.1.1) of the +x, +y, +z (LPS) directions and their
#: opposites.
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))

#: Source attributes kept when the source had been compressed lossily (PS3.3 C.7.6.1.1.5:
#: a derived image of a lossy image is lossy).
_LOSSY = ("LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")

#: General Series attributes that say what anatomy the source shows, copied when present.
_ANATOMY = ("BodyPartExamined", "Laterality")


def build_overlay_series(
    volume: SourceVolume,
    labelmap: np.ndarray,
    spec: ModelSpec,
    *,
    uids: OutputUids,
    window: tuple[float, float] | None,
    software_version: str,
    series_number: int,
    max_images: int | None = None,
) -> list[Dataset]:
    """Build the burned-in overlay series of ``labelmap`` on ``volume``.

    Parameters
    ----------
    volume : SourceVolume
        The source stack; ``volume.frames[i]`` is the source plane of ``labelmap[i]``.
    labelmap : numpy.ndarray
        Shape ``(slices, rows, columns)`` equal to ``volume.array.shape``, integer (or
        bool) dtype; 0 is background, other values are ``LabelSpec.value`` of ``spec``.
    spec : ModelSpec
        The model card: name and version (SeriesDescription "<name> overlay",
        ManufacturerModelName, banner), labels (names and display colours).
    uids : OutputUids
        ``series_instance_uid`` is the overlay series; ``sop_instance_uid`` seeds the
        images' SOP Instance UIDs (from :func:`scp_node.output.uids.output_uids` with
        kind ``"sc"``).
    window : (center, width) or None
        Display window in the volume's units (HU for CT), as the card says; ``None``:
        the 1st to 99th percentile of the whole volume, the same for every image.
    software_version : str
        The node's version, written as SoftwareVersions.
    series_number : int
        SeriesNumber of the overlay series (>= 1).
    max_images : int or None, optional
        ``None``: one image per slice holding a segment. Else at most this many of them:
        the slice with the largest segmented area and the rest spread evenly over the
        segmented range (:func:`scp_node.output.preview.choose_slices`).

    Returns
    -------
    list of pydicom.dataset.Dataset
        Secondary Capture Image Storage instances (highdicom ``SCImage``), RGB, 8 bits,
        Explicit VR Little Endian, in increasing slice position; empty when no slice holds
        a segment (nothing to send). Each copies the patient and study modules of its
        source instance and the source plane's ImagePositionPatient,
        ImageOrientationPatient, PixelSpacing, SliceThickness and FrameOfReferenceUID,
        BodyPartExamined and Laterality (empty, "unknown", when the source has none) and
        the lossy compression attributes of a lossy source; its InstanceNumber is the
        source's (a multi-frame source: the frame number); its Source Image Sequence names
        the source instance (and frame). Modality OT, ConversionType WSD, ImageType
        DERIVED\\SECONDARY, BurnedInAnnotation YES.

    Raises
    ------
    OverlayError
        ``labelmap`` has the wrong shape or dtype or values that are not labels of
        ``spec``; ``window`` has a width that is not positive; ``max_images`` or
        ``series_number`` is below 1; or highdicom refused an image (the message says
        why).
    """
    _check_arguments(volume, labelmap, spec, window, series_number, max_images)
    segmented = np.flatnonzero(labelmap.reshape(labelmap.shape[0], -1).any(axis=1))
    if segmented.size == 0:
        return []
    if max_images is None:
        chosen = [int(z) for z in segmented]
    else:
        chosen = choose_slices(labelmap, max_images)
    if window is None:
        window = auto_window(volume.array)
    headers = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    created = datetime.now(UTC)
    started = time.perf_counter()
    images: list[Dataset] = []
    for z in chosen:
        frame = volume.frames[z]
        header = headers[frame.sop_instance_uid]
        pixels = _draw(volume.array[z], labelmap[z], spec, window)
        try:
            images.append(
                _image(
                    pixels,
                    volume,
                    frame,
                    header,
                    spec,
                    uids=uids,
                    software_version=software_version,
                    series_number=series_number,
                    instance_number=_source_order(frame, header, z),
                    created=created,
                )
            )
        except Exception as exc:  # highdicom raises ValueError, TypeError, KeyError, ...
            raise OverlayError(
                f"cannot build overlay of model {spec.name} {spec.version} on source "
                f"{frame.sop_instance_uid}: {exc}"
            ) from exc
    logger.info(
        "overlay series built: %d image(s) in %.3f s",
        len(images),
        time.perf_counter() - started,
        extra={
            "series_instance_uid": volume.series_instance_uid,
            "sc_series_instance_uid": uids.series_instance_uid,
        },
    )
    return images


def _check_arguments(
    volume: SourceVolume,
    labelmap: np.ndarray,
    spec: ModelSpec,
    window: tuple[float, float] | None,
    series_number: int,
    max_images: int | None,
) -> None:
    if labelmap.shape != volume.array.shape:
        raise OverlayError(
            f"labelmap has shape {labelmap.shape}, the volume {volume.array.shape} "
            "(slices, rows, columns)"
        )
    if not (np.issubdtype(labelmap.dtype, np.integer) or labelmap.dtype == np.bool_):
        raise OverlayError(f"labelmap must hold integers, not {labelmap.dtype}")
    unknown = set(np.unique(labelmap).tolist()) - {0} - {label.value for label in spec.labels}
    if unknown:
        raise OverlayError(
            f"labelmap holds values {sorted(unknown)} that are not labels of {spec.name}"
        )
    if window is not None and not window[1] > 0:
        raise OverlayError(f"window width must be positive, got {window[1]}")
    if series_number < 1:
        raise OverlayError(f"series_number must be >= 1, got {series_number}")
    if max_images is not None and max_images < 1:
        raise OverlayError(f"max_images must be >= 1 or None, got {max_images}")


def _draw(
    image: NDArray[np.floating],
    labels: NDArray[np.integer],
    spec: ModelSpec,
    window: tuple[float, float],
) -> NDArray[np.uint8]:
    """The RGB image of one slice: windowed source, outlines, banner, legend."""
    rgb = np.repeat(to_display(image, window)[:, :, None], 3, axis=2)
    present: list[LabelSpec] = []
    for label in spec.labels:
        mask = labels == label.value
        if mask.any():
            rgb[outline(mask)] = label.color
            present.append(label)
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    rows, columns = rgb.shape[:2]
    font = _font(draw, rows, columns)
    pad = max(2, round(font.size / 4))
    line = round(font.size * 1.25)
    # The banner on top: the warning, then which model made the outlines.
    draw.rectangle((0, 0, columns - 1, 2 * line + 2 * pad - 1), fill=_BOX)
    draw.text((pad, pad), DISCLAIMER, fill=_TEXT, font=font)
    draw.text((pad, pad + line), f"{spec.name} {spec.version}", fill=_TEXT, font=font)
    # The legend at the bottom left: a swatch and the name, both in the label's colour.
    if present:
        width = max(int(draw.textlength(label.name, font=font)) for label in present)
        top = rows - len(present) * line - 2 * pad
        draw.rectangle((0, top, line + width + 2 * pad, rows - 1), fill=_BOX)
        for n, label in enumerate(present):
            y = top + pad + n * line
            swatch = line - pad
            draw.rectangle((pad, y, pad + swatch - 1, y + swatch - 1), fill=label.color)
            draw.text((pad + line, y), label.name, fill=label.color, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def _font(draw: ImageDraw.ImageDraw, rows: int, columns: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font, sized to the image and shrunk until the banner fits."""
    size = max(_MIN_FONT_PX, round(min(rows, columns) / 32))
    while True:
        font = ImageFont.load_default(size=size)
        if not isinstance(font, ImageFont.FreeTypeFont):
            raise OverlayError("Pillow was built without FreeType: cannot draw scalable text")
        if size == _MIN_FONT_PX or draw.textlength(DISCLAIMER, font=font) <= columns - 4:
            return font
        size -= 1


def _image(
    pixels: NDArray[np.uint8],
    volume: SourceVolume,
    frame: SourceFrame,
    header: Dataset,
    spec: ModelSpec,
    *,
    uids: OutputUids,
    software_version: str,
    series_number: int,
    instance_number: int,
    created: datetime,
) -> hd.sc.SCImage:
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=_image_uid(uids, frame),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=_patient_orientation(volume.stack.orientation),
        transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),
        manufacturer_model_name=spec.name,
        software_versions=software_version,
        series_description=f"{spec.name} overlay"[:64],
        content_date=created.date(),
        content_time=created.time(),
    )
    # The whole patient and study modules, not only the attributes the constructor takes.
    image.copy_patient_and_study_information(header)
    # highdicom stamps local time; the node writes UTC throughout.
    image.InstanceCreationDate = DA(created.date())
    image.InstanceCreationTime = TM(created.time())
    image.DateOfSecondaryCapture = DA(created.date())
    image.TimeOfSecondaryCapture = TM(created.time())
    image.ConversionType = "WSD"
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.BurnedInAnnotation = "YES"
    image.ImagePositionPatient = [DS(v, auto_format=True) for v in frame.position]
    image.ImageOrientationPatient = [DS(v, auto_format=True) for v in volume.stack.orientation]
    # Set here rather than through the constructor, whose annotation wants integers.
    image.PixelSpacing = [DS(v, auto_format=True) for v in volume.stack.pixel_spacing]
    thickness = _slice_thickness(header, frame)
    if thickness is not None:
        image.SliceThickness = thickness
    image.FrameOfReferenceUID = volume.frame_of_reference_uid
    for keyword in _ANATOMY:
        if header.get(keyword):
            image[keyword] = header[keyword]
    if "Laterality" not in image:
        # Type 2C, required for paired body parts (PS3.3 C.7.3.1). The source does not say,
        # and BodyPartExamined is often a free term (PARTIALBODY) that tells no pairing:
        # empty says "unknown", which validators accept for any body part.
        image.Laterality = ""
    if header.get("LossyImageCompression") == "01":
        for keyword in _LOSSY:
            if keyword in header:
                image[keyword] = header[keyword]
    image.DerivationDescription = (
        f"Segment outlines of {spec.name} {spec.version} burned into the source image"
    )[:1024]
    image.SourceImageSequence = [_source_reference(header, frame)]
    return image


def _image_uid(uids: OutputUids, frame: SourceFrame) -> str:
    # JSON keeps the parts unambiguous, as in scp_node.output.uids.
    key = json.dumps(
        ["scp-node SC image", uids.sop_instance_uid, frame.sop_instance_uid, frame.frame_number]
    )
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, key).int}"


def _source_order(frame: SourceFrame, header: Dataset, index: int) -> int:
    """The number the source gives the plane: its frame number in a multi-frame image, its
    InstanceNumber otherwise; the 1-based stack position when the source has none."""
    if frame.frame_number is not None:
        return frame.frame_number
    try:
        number = int(header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return number if number >= 1 else index + 1


def _patient_orientation(orientation: tuple[float, ...]) -> tuple[str, str]:
    """PatientOrientation (row, column direction) from ImageOrientationPatient.

    The main axis of each direction only: highdicom accepts one letter per direction.
    """

    def letter(cosines: tuple[float, ...]) -> str:
        axis = int(np.argmax(np.abs(cosines)))
        positive, negative = _AXIS_LETTERS[axis]
        return positive if cosines[axis] > 0 else negative

    return letter(orientation[:3]), letter(orientation[3:6])


def _slice_thickness(header: Dataset, frame: SourceFrame) -> str | None:
    """SliceThickness of the source plane as the source wrote it; ``None`` when absent."""
    if frame.frame_number is None:
        value = header.get("SliceThickness")
        return str(value) if value not in (None, "") else None
    # A multi-frame image keeps it in the frame's Pixel Measures, else the shared one.
    holders = []
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) >= frame.frame_number:
        holders.append(per_frame[frame.frame_number - 1])
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared:
        holders.append(shared[0])
    for holder in holders:
        measures = holder.get("PixelMeasuresSequence")
        if measures and measures[0].get("SliceThickness") not in (None, ""):
            return str(measures[0].SliceThickness)
    return None


def _source_reference(header: Dataset, frame: SourceFrame) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if frame.frame_number is not None:
        item.ReferencedFrameNumber = frame.frame_number
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept(*codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item
