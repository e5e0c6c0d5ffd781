"""Job-table rows for DICOM files already on disk (tests that skip the C-STORE)."""

from __future__ import annotations

from pathlib import Path

import pydicom

from scp_node.queue import InstanceRecord
from scp_node.queue.intake import Intake


def record_file(intake: Intake, path: Path, calling_ae: str) -> None:
    """Record ``path`` as if it had just been received from ``calling_ae``."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    intake.record_instance(
        InstanceRecord(
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            modality=str(ds.Modality),
            path=str(path),
            size_bytes=path.stat().st_size,
            calling_ae=calling_ae,
        )
    )
