"""Checks of a SEG that reached the PACS stand-in, against its source series and a reference
label map: Dice, frame-to-source-slice references, the label map in source slice order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset

from tests.support.net import PacsStub, wait_until


def dice_score(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def wait_for_seg(pacs: PacsStub, timeout_s: float) -> Path:
    """The first file (by name) the PACS stand-in stored, once there is one."""
    path: Path = wait_until(
        lambda: next(iter(sorted(pacs.directory.glob("*.dcm"))), None),
        timeout_s,
        "a SEG at the PACS",
        poll_s=1.0,
    )
    return path


def assert_frames_on_source_slices(seg: hd.seg.Segmentation, sources: Sequence[Dataset]) -> None:
    """Every frame of ``seg`` lies at a source slice's position (to 1 µm) and names that
    slice's SOP Instance UID as its source image."""
    by_position = {
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient): str(ds.SOPInstanceUID)
        for ds in sources
    }
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
        uid = by_position[tuple(round(float(v), 3) for v in position)]
        assert derived.ReferencedSOPInstanceUID == uid


def labelmap_by_source(
    seg: hd.seg.Segmentation, order: Sequence[str]
) -> tuple[np.ndarray, dict[int, str]]:
    """The SEG's segments as one uint8 label map of ``(len(order), Rows, Columns)``, slice
    ``i`` the frame of source instance ``order[i]`` (missing frames must be empty), and each
    segment number's label."""
    labelmap = np.zeros((len(order), seg.Rows, seg.Columns), dtype=np.uint8)
    names = {}
    for number in seg.segment_numbers:
        names[number] = seg.get_segment_description(number).segment_label
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=order,
            segment_numbers=[number],
            assert_missing_frames_are_empty=True,
        )[..., 0]
        labelmap[frames > 0] = number
    return labelmap, names
