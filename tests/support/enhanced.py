"""Multi-frame test instances made from subject B's real CT slices.

* :func:`legacy_converted` -- what an archive makes when it converts a series:
  highdicom's Legacy Converted Enhanced CT (or MR) Image of the slices.
* :func:`enhanced` -- the same frames labelled as an Enhanced CT / Enhanced MR Image (the
  per-frame functional groups an enhanced scanner writes: position, orientation, pixel
  measures, frame content, frame type).
* :func:`two_phase` -- one Enhanced CT object holding two phases at the same positions,
  told apart by TemporalPositionIndex in the frame content and a dimension index.

The frames keep the source pixels (JPEG 2000 lossless, not re-encoded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import MRImageStorage, generate_uid

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def _as_mr(ds: Dataset) -> Dataset:
    ds.Modality = "MR"
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    return ds


def legacy_converted(
    sources: Sequence[Path], out: Path, *, modality: str = "CT", **kwargs: object
) -> Path:
    """A Legacy Converted Enhanced CT (or MR: the slices relabelled MR) of ``sources``."""
    datasets = [pydicom.dcmread(path) for path in sources]
    if modality == "MR":
        datasets = [_as_mr(ds) for ds in datasets]
        converter: type = hd.legacy.LegacyConvertedEnhancedMRImage
    else:
        converter = hd.legacy.LegacyConvertedEnhancedCTImage
    image = converter(datasets, generate_uid(), 7, generate_uid(), 1, **kwargs)
    image.save_as(out, enforce_file_format=True)
    return out


def enhanced(sources: Sequence[Path], out: Path, *, modality: str = "CT") -> Path:
    """An Enhanced CT (or Enhanced MR) Image with the frames of ``sources``."""
    legacy_converted(sources, out, modality=modality)
    ds = pydicom.dcmread(out)
    sop_class = ENHANCED_MR if modality == "MR" else ENHANCED_CT
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    frame_type_keyword = "MRImageFrameTypeSequence" if modality == "MR" else None
    if frame_type_keyword is not None:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "CTImageFrameTypeSequence" in shared:
            shared.MRImageFrameTypeSequence = shared.CTImageFrameTypeSequence
            del shared.CTImageFrameTypeSequence
    ds.save_as(out, enforce_file_format=True)
    return out


def two_phase(phase_1: Sequence[Path], phase_2: Sequence[Path], out: Path) -> Path:
    """One Enhanced CT object: ``phase_1`` at temporal position 1, ``phase_2`` at 2.

    The phases share slice positions (``phase_2`` may be a subset); frames are ordered
    phase by phase, and the dimension index is (TemporalPositionIndex, position).
    """
    datasets = []
    series_uid = None
    for phase, paths in ((1, phase_1), (2, phase_2)):
        for path in paths:
            ds = pydicom.dcmread(path)
            series_uid = series_uid or ds.SeriesInstanceUID
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.AcquisitionNumber = 100 + phase
            ds.TemporalPositionIdentifier = phase
            datasets.append(ds)
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, generate_uid(), 8, generate_uid(), 1, include_dimension_index=False
    )
    image.save_as(out, enforce_file_format=True)
    ds = pydicom.dcmread(out)
    ds.SOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    organization = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = organization
    dimensions = []
    for pointer, group in (
        ("TemporalPositionIndex", "FrameContentSequence"),
        ("ImagePositionPatient", "PlanePositionSequence"),
    ):
        item = Dataset()
        item.DimensionOrganizationUID = organization
        item.DimensionIndexPointer = Tag(pointer)
        item.FunctionalGroupPointer = Tag(group)
        dimensions.append(item)
    ds.DimensionIndexSequence = DicomSequence(dimensions)
    counts = {1: len(phase_1), 2: len(phase_2)}
    index = 0
    for phase in (1, 2):
        for in_stack in range(1, counts[phase] + 1):
            frame = ds.PerFrameFunctionalGroupsSequence[index]
            content = frame.FrameContentSequence[0]
            content.TemporalPositionIndex = phase
            content.DimensionIndexValues = [phase, in_stack]
            content.StackID = "1"
            index += 1
    ds.save_as(out, enforce_file_format=True)
    return out
