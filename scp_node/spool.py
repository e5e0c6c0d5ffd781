"""The spool: accepted instances on disk, written durably, and the quarantine beside it.

Layout: ``<spool>/<study uid>/<series uid>/<sop uid>.dcm``; refused bytes go to
``<spool>/../quarantine`` (``<spool>/quarantine`` is never used, so a study UID cannot clash
with it) as ``<time>-<id>.dcm`` with ``<time>-<id>.json`` giving the reason.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scp_node.dicom.uids import is_valid_uid
from scp_node.durable import write_bytes_durably


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
