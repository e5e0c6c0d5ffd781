"""The whole node end to end: storescu -> scp-node serve -> SEG at a PACS stand-in.

The SEG is checked against the source files (read with pydicom), never against our own code.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import SCP_NODE
from tests.support.net import wait_until
from tests.support.validators import check_with_dciodvfy

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEG_TIMEOUT_S = 240


def _done_jobs(node: Any, count: int = 1, outcome: str = "seg") -> list[dict[str, Any]]:
    done = [j for j in node.jobs() if j["state"] == "done" and j["outcome"] == outcome]
    return done if len(done) >= count else []


def _check_seg_against_sources(seg_path: Path, sources: list[Path]) -> None:
    seg = hd.seg.segread(seg_path)
    src = [dcmread(p, stop_before_pixels=True) for p in sources]
    src_by_uid = {ds.SOPInstanceUID: ds for ds in src}

    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(src_by_uid)
    assert seg.FrameOfReferenceUID == src[0].FrameOfReferenceUID
    assert (seg.Rows, seg.Columns) == (src[0].Rows, src[0].Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in iop], [float(v) for v in src[0].ImageOrientationPatient])

    card = tomllib.loads((REPO_ROOT / "models" / "ct-abdomen" / "model.toml").read_text())
    codes = {label["name"]: label for label in card["labels"]}
    n_segments = len(seg.SegmentSequence)
    assert n_segments >= 1
    for segment in seg.SegmentSequence:
        label = codes[segment.SegmentLabel]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == label["type"]["code"]
        assert (
            segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == label["category"]["code"]
        )
        assert segment.SegmentAlgorithmType == "AUTOMATIC"

    # One frame per source slice per segment, each exactly on its source slice.
    assert int(seg.NumberOfFrames) == len(sources) * n_segments
    source_positions = sorted(tuple(float(v) for v in ds.ImagePositionPatient) for ds in src)

    def segment_of(frame: Any) -> int:
        # With one segment the identification may sit in the shared functional groups.
        holder = frame if "SegmentIdentificationSequence" in frame else shared
        return int(holder.SegmentIdentificationSequence[0].ReferencedSegmentNumber)

    for segment_number in range(1, n_segments + 1):
        frames = [
            f for f in seg.PerFrameFunctionalGroupsSequence if segment_of(f) == segment_number
        ]
        positions = sorted(
            tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient) for f in frames
        )
        assert np.allclose(positions, source_positions)
        for frame in frames:
            derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
            source = src_by_uid[derived.ReferencedSOPInstanceUID]
            assert np.allclose(
                [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                [float(v) for v in source.ImagePositionPatient],
            )

    check_with_dciodvfy(seg_path, "Segmentation")


def _assert_no_phi_in_logs(node: Any, source: Path) -> None:
    """No log the node wrote names the patient: only UIDs and job ids."""
    ds = dcmread(source, stop_before_pixels=True)
    secrets = [
        str(value)
        for value in (ds.get("PatientName"), ds.get("PatientID"), ds.get("PatientBirthDate"))
        if value
    ]
    assert secrets, "the test series must carry a patient name or ID to look for"
    logs = [node.log, *node.root.joinpath("log").glob("*.log*"), *node.root.glob("*.jsonl")]
    assert len(logs) >= 2
    for path in logs:
        text = path.read_text()
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {path.name}"
        for part in str(ds.PatientName).split("^"):
            assert part not in text, f"a part of the patient name found in {path.name}"


def test_storescu_push_yields_one_valid_seg_at_the_pacs(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path]
) -> None:
    node = node_factory().start()
    pacs = pacs_factory(node.pacs_port)
    follow_out = node.root / "logs-follow.jsonl"
    with follow_out.open("w") as handle:
        follower = subprocess.Popen(
            [str(SCP_NODE), "logs", "-f", "--json", "--config", str(node.config)],
            cwd=node.root,
            stdout=handle,
        )
    try:
        node.storescu(ct_b_files)
        wait_until(lambda: _done_jobs(node), SEG_TIMEOUT_S, "the job to be done")
        # `logs -f`, started before anything arrived, followed the job to its end live.
        wait_until(lambda: '"stage": "done"' in follow_out.read_text(), 30, "logs -f to show done")
    finally:
        follower.terminate()
        follower.wait(timeout=30)

    (job,) = node.jobs()
    assert job["outcome"] == "seg", job
    assert set(pacs.received.values()) == {1} and len(pacs.received) == 1
    (seg_file,) = pacs.files()
    _check_seg_against_sources(seg_file, ct_b_files)
    for stage in ("settle_wait", "select", "load", "inference", "seg", "delivery"):
        assert stage in job["durations"], job["durations"]

    # Pushing the same study again makes a new job whose SEG has the same UIDs.
    first_uid = job["seg_sop_instance_uid"]
    node.storescu(ct_b_files)
    wait_until(lambda: _done_jobs(node, 2), SEG_TIMEOUT_S, "the second job to be done")
    assert {j["seg_sop_instance_uid"] for j in node.jobs()} == {first_uid}
    assert list(pacs.received) == [first_uid] and pacs.received[first_uid] == 2
    assert len(pacs.files()) == 1

    _assert_no_phi_in_logs(node, ct_b_files[0])

    # The event log tells the job's story through the CLI.
    log = node.cli("logs", "--job", str(job["id"]), "--json")
    stages = {line.split('"stage": "')[1].split('"')[0] for line in log.splitlines() if line}
    assert {"settled", "claim", "load", "inference", "seg", "deliver", "done"} <= stages, stages
    # Each worker stage's event carries its own seconds, for the benchmark and an admin.
    data: dict[str, dict[str, Any]] = {}
    for event in map(json.loads, log.splitlines()):
        data.setdefault(event["stage"], {}).update(event.get("data") or {})
    assert data["load"]["slices"] == 20 and data["load"]["dtype"] == "int16", data
    assert set(data["inference"]["stages_s"]) == {"prepare", "resample_in", "network", "labels"}
    assert data["seg"]["build_s"] > 0 and data["seg"]["write_s"] > 0, data
    assert data["seg"]["bytes"] > 0
    assert data["seg"]["seg_type"] == "BINARY"

    # SIGTERM is a clean stop.
    assert node.stop() == 0
    assert "node stopped" in node.log.read_text()


def test_seg_waits_for_a_destination_that_is_down(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path]
) -> None:
    node = node_factory().start()
    node.storescu(ct_b_files)

    def failed_attempts() -> bool:
        jobs = node.jobs()
        return bool(jobs) and any(
            d["attempts"] >= 2 and d["last_error"] for d in jobs[0]["deliveries"]
        )

    wait_until(failed_attempts, SEG_TIMEOUT_S, "delivery attempts against a PACS that is down")
    assert node.jobs()[0]["state"] == "delivering"

    pacs = pacs_factory(node.pacs_port)
    wait_until(lambda: _done_jobs(node), 120, "delivery once the PACS is up")
    assert len(pacs.received) == 1 and sum(pacs.received.values()) == 1


def test_kill9_mid_series_loses_nothing(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path]
) -> None:
    node = node_factory(settle={"quiet_s": 4.0, "poll_s": 0.2}).start()
    pacs = pacs_factory(node.pacs_port)

    first, rest = ct_b_files[:9], ct_b_files[9:]
    node.storescu(first)
    node.kill9()
    assert len(node.spool_files()) == len(first)

    node.start()
    node.storescu(rest)
    wait_until(lambda: _done_jobs(node), SEG_TIMEOUT_S, "the job to be done after restart")
    acknowledged = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct_b_files}
    stored = {p.stem for p in node.spool_files()}
    assert acknowledged <= stored
    (seg_file,) = pacs.files()
    _check_seg_against_sources(seg_file, ct_b_files)
