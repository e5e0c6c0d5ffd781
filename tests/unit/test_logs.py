"""JSON-lines logging: one object per line, identifiers kept, patient data dropped."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from scp_node.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_with_extra_ids_and_no_phi(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("INFO", tmp_path / "log", stream=stream)
    logger = logging.getLogger("scp_node.test")
    logger.info(
        "stage done",
        extra={"job_id": 7, "stage": "inference", "duration_s": 1.5, "PatientName": "DOE^JANE"},
    )
    logger.debug("hidden at INFO")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "stage done"
    assert (record["job_id"], record["stage"], record["duration_s"]) == (7, "inference", 1.5)
    assert "DOE" not in line and "PatientName" not in record
    on_disk = (tmp_path / "log" / "scp-node.log").read_text().splitlines()
    assert json.loads(on_disk[0])["job_id"] == 7
