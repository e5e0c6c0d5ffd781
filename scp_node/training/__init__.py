"""Training, evaluation and export of the node's segmentation models (may use pydicom)."""

from __future__ import annotations
