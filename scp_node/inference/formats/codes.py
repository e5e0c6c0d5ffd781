"""SNOMED CT codes of anatomical structures by TotalSegmentator's structure names.

The table is TotalSegmentator's published structure -> DICOM code mapping
(``resources/totalsegmentator_snomed_mapping.csv`` in wasserth/TotalSegmentator), kept
verbatim in ``totalsegmentator_snomed.csv`` beside this module. Left and right are
segmented property type modifiers (SCT 7771000 Left, SCT 24028007 Right), as in the table.
"""

from __future__ import annotations

import csv
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["label_colour", "structure_codes"]

_TABLE = "totalsegmentator_snomed.csv"
_PREFIX = {
    "category": "SegmentedPropertyCategoryCodeSequence",
    "type": "SegmentedPropertyTypeCodeSequence",
    "modifier": "SegmentedPropertyTypeModifierCodeSequence",
}

#: A fixed palette (Slicer-like, distinct neighbours) cycled over label values.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (221, 130, 101),
    (157, 108, 162),
    (185, 102, 83),
    (255, 253, 229),
    (216, 101, 79),
    (128, 174, 128),
    (241, 214, 145),
    (177, 122, 101),
    (111, 184, 210),
    (244, 214, 49),
    (230, 220, 70),
    (183, 156, 220),
    (0, 151, 206),
    (250, 250, 225),
    (188, 65, 28),
    (145, 60, 66),
)


@cache
def _table() -> dict[str, dict[str, dict[str, str]]]:
    text = resources.files(__package__).joinpath(_TABLE).read_text(encoding="utf-8")
    out: dict[str, dict[str, dict[str, str]]] = {}
    for row in csv.DictReader(text.splitlines()):
        codes: dict[str, dict[str, str]] = {}
        for key, prefix in _PREFIX.items():
            code = row[f"{prefix}.CodeValue"].strip()
            if code:
                codes[key] = {
                    "code": code,
                    "scheme": row[f"{prefix}.CodingSchemeDesignator"].strip(),
                    "meaning": row[f"{prefix}.CodeMeaning"].strip(),
                }
        out[row["Structure"].strip()] = codes
    return out


def structure_codes(name: str) -> dict[str, dict[str, Any]] | None:
    """Category, type and (when lateral) modifier codes of a TotalSegmentator structure.

    Parameters
    ----------
    name
        The structure name as in TotalSegmentator's ``dataset.json`` (``kidney_left``).

    Returns
    -------
    dict or None
        ``{"category": {...}, "type": {...}, "modifier": {...}}`` (each ``code``,
        ``scheme``, ``meaning``; ``modifier`` only for lateral structures), or ``None``
        for a name the table does not know.
    """
    codes = _table().get(name)
    return None if codes is None else {key: dict(value) for key, value in codes.items()}


#: Structures that always get their own anatomy colour (3D Slicer's: the palette's first
#: entries), whatever their value in a model: a spleen is purple in every SEG the node makes.
_NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "liver": _PALETTE[0],
    "spleen": _PALETTE[1],
    "kidney_left": _PALETTE[2],
    "kidney_right": _PALETTE[2],
}


def label_colour(value: int, name: str | None = None) -> tuple[int, int, int]:
    """A display colour for label ``value`` (stable across runs and nodes).

    A structure named in :data:`_NAMED_COLOURS` (TotalSegmentator's names) gets its anatomy
    colour; any other label cycles the palette by value.
    """
    return _NAMED_COLOURS.get(name or "", _PALETTE[(value - 1) % len(_PALETTE)])
