"""UID checks: a UID becomes a path part only after it passed :func:`is_valid_uid`."""

from __future__ import annotations

import re

from pydicom.uid import UID

#: Verification SOP Class (C-ECHO).
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """True for a DICOM UID (PS3.5 9.1): digits and dots, no leading zeros, at most 64 chars.

    Anything else (empty, ``..``, slashes, spaces) is refused, so a UID can never escape the
    spool directory when used as a file name.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID.match(value))
