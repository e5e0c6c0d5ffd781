"""The spool: accepted instances on disk, written durably, and the quarantine beside it.

Layout: ``<spool>/<study uid>/<series uid>/<sop uid>.dcm``; refused bytes go to
``<spool>/../quarantine`` (``<spool>/quarantine`` is never used, so a study UID cannot clash
with it) as ``<time>-<id>.dcm`` with ``<time>-<id>.json`` giving the reason.

The spool is the source of truth for what was received: a C-STORE is acknowledged only once
its file and directory entry are fsynced and its row is committed, but on SQLite the intake
commits without waiting for the disk (``synchronous=NORMAL``), so a power cut may lose the
last rows. :func:`recover_unrecorded`, run before the receive stage starts, records every
spooled file that has no row. A row whose file is missing cannot happen: the file is durable
before the row is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from scp_node.dicom.uids import is_valid_uid
from scp_node.dicom.validate import InstanceRejectedError, check_instance
from scp_node.durable import PART_SUFFIX, write_bytes_durably
from scp_node.queue.intake import Intake
from scp_node.queue.records import InstanceRecord

__all__ = ["RECOVERED_CALLING_AE", "Spool", "recover_unrecorded"]

logger = logging.getLogger(__name__)

#: The calling AE title recorded for an instance restored from the spool (the sender's own
#: is not kept in the file).
RECOVERED_CALLING_AE = ""
#: Instances recorded per transaction while recovering.
_RECOVER_BATCH = 500


class Spool:
    """Where accepted instances live; the job table points at these files."""

    def __init__(self, root: Path, quarantine: Path | None = None) -> None:
        self.root = root
        self.quarantine_dir = quarantine or root.parent / "quarantine"
        self.root.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        """Free bytes on the file system that holds the spool."""
        return shutil.disk_usage(self.root).free

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """The file for one instance.

        Raises
        ------
        ValueError
            A UID is not a valid DICOM UID (it would be unsafe as a path part).
        """
        for name, uid in (("study", study_uid), ("series", series_uid), ("sop", sop_uid)):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid {name} UID")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def store(
        self, study_uid: str, series_uid: str, sop_uid: str, data: bytes, *, sync_dir: bool = True
    ) -> Path:
        """Durably write one instance; a re-sent instance replaces its earlier copy.

        With ``sync_dir=False`` the file is complete and fsynced but its directory entry is
        durable only once the caller fsyncs ``path.parent`` (group commit does, once per
        group).

        Raises
        ------
        ValueError
            A UID is not a valid DICOM UID.
        OSError
            The file cannot be written; an earlier copy is left as it was.
        """
        path = self.instance_path(study_uid, series_uid, sop_uid)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_bytes_durably(path, data, sync_dir=sync_dir)

    def quarantine(self, data: bytes, reason: str, details: dict[str, Any]) -> Path:
        """Keep refused bytes with the reason beside them; returns the ``.dcm`` path."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        stem = f"{stamp}-{uuid.uuid4().hex[:12]}"
        path = self.quarantine_dir / f"{stem}.dcm"
        write_bytes_durably(path, data)
        meta = {"reason": reason, "quarantined_at": datetime.now(UTC).isoformat(), **details}
        write_bytes_durably(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
        return path


def _spooled_files(spool: Spool) -> list[Path]:
    """Every ``<study>/<series>/<sop>.dcm`` in the spool; ``.part`` files (writes a crash
    interrupted, never acknowledged) are removed."""
    found: list[Path] = []
    for study in os.scandir(spool.root):
        if not study.is_dir(follow_symlinks=False):
            continue
        for series in os.scandir(study.path):
            if not series.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(series.path):
                path = spool.root / study.name / series.name / entry.name
                if entry.name.endswith(PART_SUFFIX):
                    path.unlink(missing_ok=True)
                elif entry.name.endswith(".dcm"):
                    found.append(path)
    return found


def _is_newer(path: Path, than: str) -> bool:
    try:
        return path.stat().st_mtime_ns > Path(than).stat().st_mtime_ns
    except FileNotFoundError:
        return True


def recover_unrecorded(spool: Spool, intake: Intake) -> int:
    """Record every spooled instance the job table lacks (rows a power cut took).

    A file counts as recorded when its SOP Instance UID has a row pointing at it, or at
    another spooled copy at least as new (an instance re-sent under another series). The
    rest are checked as on receipt and recorded as if just received (their study waits
    ``settle.quiet_s`` again); one that fails the check is left in place and logged.
    Leftover ``.part`` files are removed.

    Returns
    -------
    int
        Instances recorded.

    Raises
    ------
    QueueError
        If the job table cannot be read or written.
    OSError
        If the spool cannot be listed.
    """
    known = intake.instance_paths()
    pending: list[InstanceRecord] = []
    recorded = 0
    for path in _spooled_files(spool):
        sop_uid = path.name.removesuffix(".dcm")
        row_path = known.get(sop_uid)
        if row_path == str(path) or (row_path is not None and not _is_newer(path, row_path)):
            continue
        try:
            data = path.read_bytes()
            header = check_instance(data, sop_uid)
            meta = read_file_meta_info(path)
        except (OSError, InstanceRejectedError) as exc:
            logger.warning(
                "spooled file without a row cannot be recorded",
                extra={"sop_instance_uid": sop_uid, "error": str(exc)},
            )
            continue
        pending.append(
            header.record(
                sop_class_uid=str(meta.get("MediaStorageSOPClassUID", "")),
                transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")),
                path=str(path),
                size_bytes=len(data),
                calling_ae=RECOVERED_CALLING_AE,
            )
        )
        if len(pending) >= _RECOVER_BATCH:
            recorded += len(intake.record_instances(pending))
            pending = []
    if pending:
        recorded += len(intake.record_instances(pending))
    if recorded:
        logger.warning("spooled instances without a row recorded", extra={"instances": recorded})
    return recorded
