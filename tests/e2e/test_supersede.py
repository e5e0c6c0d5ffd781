"""A series that grows after its SEG was sent (issue 13), against Orthanc's default behaviour.

Orthanc holds subject B and pushes 14 of its 20 slices to the node; the SEG comes back;
then Orthanc pushes the other 6. Orthanc keeps the first instance it stored under a SOP
Instance UID (``OverwriteInstances`` is false by default), so the rebuilt SEG only reaches
it under a new UID: at the end Orthanc must hold a SEG that covers all 20 slices. With
``supersede = "iocm"`` the node must also send a rejection note for the 14-slice SEG, and
both jobs must say which SEG superseded which.
"""

from __future__ import annotations

import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset

from tests.e2e.conftest import NodeProcess, write_config
from tests.support.net import free_port, wait_until
from tests.support.orthanc import OrthancServer

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEG_TIMEOUT_S = 240
#: How long a rejection note may take after the SEG that supersedes the first one landed.
KOS_TIMEOUT_S = 60
FIRST_PART = 14


@dataclass
class TwoParts:
    """What the two-part push left behind."""

    orthanc: OrthancServer
    node: NodeProcess
    study_id: str
    #: SOP Instance UIDs of the 20 CT slices, and of the 14 pushed first.
    ct_uids: set[str]
    first_uids: set[str]
    #: The SEG that landed after the first part, and the one that covers all 20 slices.
    first_seg: Dataset
    full_seg: Dataset
    #: Every SEG instance Orthanc holds, by Orthanc instance ID.
    segs: dict[str, Dataset] = field(default_factory=dict)


def _sources(seg: Dataset) -> set[str]:
    """Source SOP Instance UIDs the SEG's frames were derived from."""
    return {
        str(source.ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
        for derivation in frame.DerivationImageSequence
        for source in derivation.SourceImageSequence
    }


def _referenced(seg: Dataset) -> set[str]:
    """Instances listed in the SEG's ReferencedSeriesSequence."""
    return {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }


def _instances_of(orthanc: OrthancServer, study_id: str, modality: str) -> list[str]:
    return [
        str(instance["ID"])
        for series in orthanc.study_series(study_id)
        if series["MainDicomTags"].get("Modality") == modality
        for instance in orthanc.series_instances(str(series["ID"]))
    ]


def _read(orthanc: OrthancServer, instance_id: str, path: Path) -> Dataset:
    path.write_bytes(orthanc.instance_file(instance_id))
    return pydicom.dcmread(path)


def _collect_segs(orthanc: OrthancServer, study_id: str, root: Path, segs: dict[str, Any]) -> None:
    for instance_id in _instances_of(orthanc, study_id, "SEG"):
        if instance_id not in segs:
            segs[instance_id] = _read(orthanc, instance_id, root / f"seg-{instance_id}.dcm")


@pytest.fixture
def two_parts(
    request: pytest.FixtureRequest, tmp_path: Path, ct_b_files: list[Path]
) -> Iterator[TwoParts]:
    """Run the two-part push with the destination's ``supersede`` set to ``request.param``."""
    supersede = str(request.param)
    node_port = free_port()
    orthanc = OrthancServer(
        tmp_path / "orthanc", modalities={"node": ("SCPNODE", "127.0.0.1", node_port)}
    ).start()
    node_root = tmp_path / "node"
    node_root.mkdir()
    config = write_config(
        node_root,
        node_port,
        orthanc.dicom_port,
        destinations=[
            {
                "name": "orthanc",
                "ae_title": orthanc.ae_title,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "supersede": supersede,
                # Each store counts once Orthanc lists the instance (C-FIND at IMAGE level).
                "verify": True,
            }
        ],
    )
    node = NodeProcess(node_root, config, node_port, orthanc.dicom_port)
    try:
        node.start()
        by_z: list[tuple[float, str, str]] = []
        studies: set[str] = set()
        for path in ct_b_files:
            answer = orthanc.upload(path)
            studies.add(str(answer["ParentStudy"]))
            header = pydicom.dcmread(path, stop_before_pixels=True)
            z = float(header.ImagePositionPatient[2])
            by_z.append((z, str(answer["ID"]), str(header.SOPInstanceUID)))
        (study_id,) = studies
        by_z.sort()
        # One contiguous block of slices first, as a modality still sending would leave it.
        first, rest = by_z[:FIRST_PART], by_z[FIRST_PART:]

        segs: dict[str, Dataset] = {}
        orthanc.send_to_modality("node", [instance_id for _z, instance_id, _uid in first])

        def first_seg() -> Dataset | None:
            _collect_segs(orthanc, study_id, tmp_path, segs)
            return next(iter(segs.values()), None)

        seg_one = wait_until(first_seg, SEG_TIMEOUT_S, "the first SEG in Orthanc", poll_s=1.0)
        orthanc.send_to_modality("node", [instance_id for _z, instance_id, _uid in rest])
        ct_uids = {uid for _z, _id, uid in by_z}

        def full_seg() -> Dataset | None:
            _collect_segs(orthanc, study_id, tmp_path, segs)
            covering = [seg for seg in segs.values() if _sources(seg) == ct_uids]
            return covering[0] if covering else None

        seg_full = wait_until(
            full_seg, SEG_TIMEOUT_S, "a SEG covering all 20 slices in Orthanc", poll_s=1.0
        )
        yield TwoParts(
            orthanc,
            node,
            study_id,
            ct_uids,
            {uid for _z, _id, uid in first},
            seg_one,
            seg_full,
            segs,
        )
    except urllib.error.HTTPError as exc:
        raise AssertionError(orthanc.http_error(exc)) from exc
    finally:
        node.stop()
        orthanc.stop()


@pytest.mark.parametrize("two_parts", ["none"], indirect=True)
def test_orthanc_ends_with_a_seg_of_all_20_slices(two_parts: TwoParts) -> None:
    first, full = two_parts.first_seg, two_parts.full_seg
    # The first SEG was made from the first part only, and Orthanc still holds it.
    assert _sources(first) == _referenced(first) == two_parts.first_uids
    assert int(first.NumberOfFrames) % FIRST_PART == 0

    # The SEG of the whole series: every frame on a source slice, all 20 slices referenced,
    # one frame per slice per segment.
    assert _sources(full) == _referenced(full) == two_parts.ct_uids
    segments = len(full.SegmentSequence)
    assert int(full.NumberOfFrames) == segments * len(two_parts.ct_uids)
    # A new instance in the same SEG series, so viewers group the two versions.
    assert full.SOPInstanceUID != first.SOPInstanceUID
    assert full.SeriesInstanceUID == first.SeriesInstanceUID
    assert full.StudyInstanceUID == first.StudyInstanceUID

    # Exactly one instance per SEG UID, one per distinct input: the 14- and the 20-slice SEG.
    held = sorted(str(seg.SOPInstanceUID) for seg in two_parts.segs.values())
    assert held == sorted({str(first.SOPInstanceUID), str(full.SOPInstanceUID)})

    # The node ran one job per part and says so.
    def all_done() -> list[dict[str, Any]] | None:
        jobs = two_parts.node.jobs()
        return jobs if jobs and all(job["state"] == "done" for job in jobs) else None

    jobs = wait_until(all_done, 60, "the node's jobs to finish", poll_s=1.0)
    assert sorted(job["seg_sop_instance_uid"] for job in jobs) == held


@pytest.mark.parametrize("two_parts", ["iocm"], indirect=True)
def test_iocm_sends_a_rejection_note_for_the_first_seg(two_parts: TwoParts, tmp_path: Path) -> None:
    orthanc, study_id = two_parts.orthanc, two_parts.study_id
    try:
        (kos_id,) = wait_until(
            lambda: _instances_of(orthanc, study_id, "KO"),
            KOS_TIMEOUT_S,
            "a rejection note in Orthanc",
            poll_s=1.0,
        )
    except TimeoutError:
        kos_id = None
    assert kos_id is not None, "no Key Object Selection document reached Orthanc"
    kos = _read(orthanc, kos_id, tmp_path / "kos.dcm")
    title = kos.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    (study,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == two_parts.first_seg.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == two_parts.first_seg.SeriesInstanceUID
    (instance,) = series.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == two_parts.first_seg.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == two_parts.first_seg.SOPClassUID

    def all_done() -> list[dict[str, Any]] | None:
        jobs = two_parts.node.jobs()
        return jobs if len(jobs) == 2 and all(j["state"] == "done" for j in jobs) else None

    old, new = sorted(wait_until(all_done, 60, "both jobs done", poll_s=1.0), key=lambda j: j["id"])
    assert new["supersedes"]["sop_instance_uid"] == two_parts.first_seg.SOPInstanceUID
    assert old["superseded_by"]["sop_instance_uid"] == two_parts.full_seg.SOPInstanceUID
    assert (old["seg_instance_number"], new["seg_instance_number"]) == (1, 2)
    kinds = sorted(d["kind"] for d in new["deliveries"])
    assert kinds == ["kos", "seg"]
