"""Named DIMSE status codes the node returns or recognises (PS3.4 Annex B, PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """C-STORE / C-ECHO response statuses."""

    #: Stored durably and recorded.
    SUCCESS = 0x0000
    #: Refused: out of resources (free disk under ``storage.min_free_bytes``).
    OUT_OF_RESOURCES = 0xA700
    #: Error: data set does not match SOP class (identifying UIDs missing or invalid).
    DATASET_DOES_NOT_MATCH = 0xA900
    #: Error: cannot understand (the bytes do not parse as a DICOM data set).
    CANNOT_UNDERSTAND = 0xC210
    #: Failure: processing failure (an internal error; the instance was not accepted).
    PROCESSING_FAILURE = 0x0110
    #: Refused: SOP class not supported.
    SOP_CLASS_NOT_SUPPORTED = 0x0122


def is_success(status: int) -> bool:
    """Success or warning (0x0000, 0x0001, 0xBxxx) means the peer kept the instance."""
    return status == 0x0000 or status == 0x0001 or (status & 0xF000) == 0xB000
