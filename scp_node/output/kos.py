"""IHE IOCM rejection note: a Key Object Selection document that retracts a superseded SEG.

When a series grows after its SEG was sent, the node builds a new SEG (a new SOP Instance
in the same SEG series) and, for destinations with ``supersede = "iocm"``, sends this note
after the new SEG was stored: a KOS titled (113001, DCM, "Rejected for Quality Reasons")
whose evidence is the superseded SEG. Archives that implement IHE IOCM (e.g. dcm4chee) then
hide the old SEG; others keep the note as one more instance of the study.

The note's UIDs follow :func:`scp_node.output.uids.output_uids` with kind ``"kos"``: one KO
series per (source series, model, version), and an instance per (superseded, superseding)
pair, so a resent note replaces itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from scp_node.dicom.reference import InstanceReference
from scp_node.durable import write_durably
from scp_node.errors import SegmentationError
from scp_node.output.seg import MANUFACTURER
from scp_node.output.uids import output_uids

__all__ = ["REJECTED_FOR_QUALITY_REASONS", "build_rejection_note", "write_rejection_note"]

#: CID 7011 document title of an IOCM rejection note for a result that was replaced.
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")

#: Patient and study attributes the note copies from the superseding SEG (highdicom reads
#: them off its first evidence item).
_PATIENT_STUDY = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def build_rejection_note(
    superseded: InstanceReference,
    superseding: Dataset,
    *,
    source_series_instance_uid: str,
    model_name: str,
    model_version: str,
    software_version: str,
    series_number: int = 9902,
    instance_number: int = 1,
) -> hd.ko.KeyObjectSelectionDocument:
    """Build the IOCM rejection note that retracts ``superseded`` in favour of ``superseding``.

    Parameters
    ----------
    superseded : InstanceReference
        The SEG to retract, as it was delivered (study, series, SOP Instance, SOP Class).
    superseding : pydicom.dataset.Dataset
        The new SEG (a header is enough); patient and study attributes are copied from it.
    source_series_instance_uid : str
        The source series both SEGs were made from.
    model_name, model_version : str
        The model that made the superseded SEG (the note's series follows them).
    software_version : str
        The node's version, written as SoftwareVersions.
    series_number, instance_number : int, optional
        SeriesNumber and InstanceNumber of the note.

    Returns
    -------
    highdicom.ko.KeyObjectSelectionDocument
        The note: title (113001, DCM), one reference (the superseded SEG) in the content
        tree and in CurrentRequestedProcedureEvidenceSequence, a Key Object Description
        naming the superseding SOP Instance UID, ContentDate/Time now (UTC).

    Raises
    ------
    SegmentationError
        The two SEGs are not of one study, they are the same instance, or highdicom
        refused to build the note (the message says why).
    """
    superseding_uid = str(superseding.get("SOPInstanceUID", ""))
    if str(superseding.get("StudyInstanceUID", "")) != superseded.study_instance_uid:
        raise SegmentationError(
            "the superseding SEG is not in the study of the superseded one "
            f"({superseded.study_instance_uid})"
        )
    if superseding_uid == superseded.sop_instance_uid:
        raise SegmentationError(f"SEG {superseding_uid} cannot supersede itself")
    uids = output_uids(
        "kos",
        source_series_instance_uid=source_series_instance_uid,
        model_name=model_name,
        model_version=model_version,
        # Role-tagged, so "A superseded by B" and "B superseded by A" differ.
        source_sop_instance_uids=(
            f"superseded {superseded.sop_instance_uid}",
            f"superseding {superseding_uid}",
        ),
    )
    evidence = Dataset()
    for keyword in _PATIENT_STUDY:
        setattr(evidence, keyword, superseding.get(keyword))
    evidence.StudyInstanceUID = superseded.study_instance_uid
    evidence.SeriesInstanceUID = superseded.series_instance_uid
    evidence.SOPInstanceUID = superseded.sop_instance_uid
    evidence.SOPClassUID = superseded.sop_class_uid
    if "Rows" in superseding and "Columns" in superseding:
        # A SEG is an image: highdicom references datasets with Rows/Columns as IMAGE items.
        evidence.Rows, evidence.Columns = superseding.Rows, superseding.Columns
    content = datetime.now(UTC)
    try:
        return hd.ko.KeyObjectSelectionDocument(
            evidence=[evidence],
            content=hd.ko.KeyObjectSelection(
                document_title=REJECTED_FOR_QUALITY_REASONS,
                referenced_objects=[evidence],
                description=f"Superseded by {superseding_uid}",
            ),
            series_instance_uid=uids.series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model_name,
            software_versions=software_version,
            device_serial_number=MANUFACTURER,
            series_description="Rejected results",
            content_date=content.date(),
            content_time=content.time(),
        )
    except Exception as exc:  # highdicom raises ValueError, TypeError, AttributeError, ...
        raise SegmentationError(
            f"cannot build the rejection note of SEG {superseded.sop_instance_uid}: {exc}"
        ) from exc


def write_rejection_note(note: hd.ko.KeyObjectSelectionDocument, path: Path) -> None:
    """Write ``note`` durably to ``path`` (``.part``, fsync, rename; the parent must exist).

    Raises
    ------
    SegmentationError
        The file cannot be written (the message names the path); no ``.part`` is left.
    """
    try:
        write_durably(path, lambda handle: note.save_as(handle, enforce_file_format=True))
    except (OSError, ValueError) as exc:
        raise SegmentationError(f"cannot write rejection note to {path}: {exc}") from exc
