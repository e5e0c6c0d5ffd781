"""Deterministic UIDs of every object the node writes (SEG, and later KOS, SR, SC).

One rule for all of them: the Series Instance UID derives from (output kind, source series,
model name, model version), so every version of one result lands in one series; the SOP
Instance UID derives from those and the *set* of instances the object was made from, so a
retry or a re-run on unchanged input writes the same instance again (the PACS keeps one)
while a changed input (an instance more or less) gives a new instance, never new content
under an old UID.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["OutputKind", "OutputUids", "output_uids"]

#: What a derived object is: a segmentation, a key object selection (IOCM rejection note),
#: a structured report, a secondary capture.
OutputKind = Literal["seg", "kos", "sr", "sc"]

_KINDS: frozenset[str] = frozenset(get_args(OutputKind))


@dataclass(frozen=True)
class OutputUids:
    """The UIDs of one derived object."""

    series_instance_uid: str
    sop_instance_uid: str


def output_uids(
    kind: OutputKind,
    *,
    source_series_instance_uid: str,
    model_name: str,
    model_version: str,
    source_sop_instance_uids: Iterable[str],
    variant: str | None = None,
) -> OutputUids:
    """Series and SOP Instance UID of a derived object, the same every time for the same inputs.

    UUID-derived UIDs (PS3.5 B.2, ``2.25.<decimal UUID>``, at most 44 characters) from
    name-based (version 5) UUIDs. pydicom's ``generate_uid(prefix=None, ...)`` cannot be
    used: it ignores ``entropy_srcs`` and returns a random UUID when ``prefix`` is None.
    For ``kind="seg"`` the Series Instance UID is the one earlier versions of the node
    derived from (source series, model, version), so existing SEG series continue.

    Parameters
    ----------
    kind : {"seg", "kos", "sr", "sc"}
        The kind of object; objects of different kinds never share a UID or a series.
    source_series_instance_uid : str
        Series Instance UID of the source images.
    model_name, model_version : str
        From the model card.
    source_sop_instance_uids : iterable of str
        The instances the object was built from. Order and repetitions do not matter (the
        set is sorted); only the SOP Instance UID depends on it.

    Returns
    -------
    OutputUids
        Two distinct valid UIDs.

    Raises
    ------
    ValueError
        ``kind`` is not one of the kinds above, or ``source_sop_instance_uids`` is empty
        (an object made from nothing cannot be told apart from its next version).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, not {kind!r}")
    instances = sorted(set(source_sop_instance_uids))
    if not instances:
        raise ValueError("source_sop_instance_uids is empty")
    series_key = [source_series_instance_uid, model_name, model_version]
    label = kind.upper()
    instance_key: list[str | list[str]] = [f"scp-node {label} instance", *series_key, instances]
    if variant is not None:
        instance_key.append(variant)
    return OutputUids(
        series_instance_uid=_uuid_uid([f"scp-node {label} series", *series_key]),
        sop_instance_uid=_uuid_uid(instance_key),
    )


def _uuid_uid(parts: list[str | list[str]]) -> str:
    # JSON keeps the parts unambiguous ("a.b" + "c" differs from "a" + "b.c").
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, json.dumps(parts)).int}"
