"""C-FIND completeness against a real Orthanc: a study known to be incomplete is not settled,
and it is settled at once (without the quiet period) when the last instance arrives. So a
series pushed in two parts makes one SEG, and with ``supersede = "iocm"`` no rejection note
(issue 13: the gate is what keeps a growing series from making two versions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import NodeProcess
from tests.support.config import write_config
from tests.support.net import free_port, wait_until
from tests.support.orthanc import OrthancServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

QUIET_S = 60.0  # far longer than the test waits: only the completeness check can settle


def _seg_series(orthanc: OrthancServer, study_id: str) -> str | None:
    for series in orthanc.study_series(study_id):
        if series["MainDicomTags"].get("Modality") == "SEG":
            return str(series["ID"])
    return None


def test_incomplete_study_waits_and_complete_study_settles_at_once(
    tmp_path: Path, ct_b_files: list[Path]
) -> None:
    node_port = free_port()
    orthanc = OrthancServer(
        tmp_path / "orthanc", modalities={"node": ("SCPNODE", "127.0.0.1", node_port)}
    ).start()
    root = tmp_path / "node"
    root.mkdir()
    config = write_config(
        root,
        node_port,
        orthanc.dicom_port,
        settle={
            "quiet_s": QUIET_S,
            "poll_s": 0.2,
            "completeness_check": True,
            "max_wait_s": 600.0,
            "query_interval_s": 0.5,
        },
        destinations=[
            {
                "name": "orthanc",
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "supersede": "iocm",
            }
        ],
    )
    with config.open("a") as handle:
        handle.write(
            f'\n[[sources]]\nname = "orthanc"\nae_title = "{orthanc.ae_title}"\n'
            f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
        )
    node = NodeProcess(root, config, node_port, orthanc.dicom_port)
    try:
        node.start()
        answers = [orthanc.upload(path) for path in ct_b_files]
        (study_id,) = {a["ParentStudy"] for a in answers}
        instance_ids = [a["ID"] for a in answers]

        orthanc.send_to_modality("node", instance_ids[:14])
        wait_until(
            lambda: "study incomplete" in node.log.read_text(), 60, "the node to see 6 missing"
        )
        assert node.jobs() == []  # quiet for a while, but known to be incomplete

        orthanc.send_to_modality("node", instance_ids[14:])
        wait_until(lambda: _seg_series(orthanc, study_id), 240, "the SEG in Orthanc")
        (job,) = node.jobs()
        assert job["state"] == "done" and job["outcome"] == "seg"
        # Settled because C-FIND said all 20 were there, not because the study went quiet.
        assert job["durations"]["settle_wait"] < QUIET_S
        (seg,) = orthanc.series_instances(_seg_series(orthanc, study_id) or "")
        frames = orthanc.get(f"/instances/{seg['ID']}/tags?simplify")["NumberOfFrames"]
        assert int(frames) == 20  # the one job covered the whole series
        modalities = [s["MainDicomTags"].get("Modality") for s in orthanc.study_series(study_id)]
        assert sorted(modalities) == ["CT", "SEG"]  # one version: nothing to retract, no KO
    finally:
        node.stop()
        orthanc.stop()
