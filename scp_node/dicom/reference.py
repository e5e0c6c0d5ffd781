"""A reference to one stored DICOM instance: what a rejection note or a query needs of it."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

from scp_node.dicom.uids import is_valid_uid

__all__ = ["InstanceReference"]


@dataclass(frozen=True)
class InstanceReference:
    """Study, series, SOP Instance and SOP Class UID of one instance.

    Raises
    ------
    ValueError
        A field is not a valid UID (the message names it).
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str

    def __post_init__(self) -> None:
        for name in (
            "study_instance_uid",
            "series_instance_uid",
            "sop_instance_uid",
            "sop_class_uid",
        ):
            if not is_valid_uid(getattr(self, name)):
                raise ValueError(f"{name} is not a valid UID: {getattr(self, name)!r}")

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> InstanceReference:
        """The reference of ``dataset`` (a header is enough).

        Raises
        ------
        ValueError
            One of the four UIDs is missing or invalid.
        """
        return cls(
            study_instance_uid=str(dataset.get("StudyInstanceUID", "")),
            series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
            sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
            sop_class_uid=str(dataset.get("SOPClassUID", "")),
        )
