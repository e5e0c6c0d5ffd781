"""Old import path of :func:`scp_node.dicom.volume.load_volume`.

Kept only for ``tests/support/seeded.py``, which this change may not edit; delete this
module once that import reads ``from scp_node.dicom.volume import load_volume``.
"""

from __future__ import annotations

from scp_node.dicom.volume import load_volume

__all__ = ["load_volume"]
