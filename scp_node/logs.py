"""JSON-lines logging to stdout and a rotating file.

Only identifiers reach the logs: job ids, UIDs, AE titles, stage names and durations. Modules
pass them as ``extra={...}``; the formatter copies every extra key into the JSON object, so
nothing a caller did not name explicitly (such as a dataset) is ever serialised.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)

#: Keys that may carry personal data; a record that names one of them is refused loudly in
#: tests and stripped in production.
PHI_KEYS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "accession_number",
    }
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's extra keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key in PHI_KEYS:
                continue
            payload[key] = (
                value if isinstance(value, str | int | float | bool | None) else str(value)
            )
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, separators=(",", ":"))


def configure_logging(
    level: str,
    log_dir: Path | None,
    *,
    max_bytes: int = 10_000_000,
    backups: int = 5,
    stream: TextIO | None = None,
    file_name: str = "scp-node.log",
) -> None:
    """Send every ``scp_node`` record (and pynetdicom's warnings) as JSON lines to
    ``stream`` (stdout by default) and to ``log_dir/file_name`` rotated at ``max_bytes``."""
    formatter = JsonFormatter()
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(stream or sys.stdout)
    console.setFormatter(formatter)
    handlers.append(console)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            log_dir / file_name, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        rotating.setFormatter(formatter)
        handlers.append(rotating)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("scp_node").setLevel(level)
    # pynetdicom logs dataset contents at DEBUG/INFO (patient names among them): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
