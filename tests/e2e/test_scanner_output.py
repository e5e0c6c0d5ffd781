"""Studies shaped the way scanners and archives send them, pushed with dcmtk's storescu into
`scp-node serve` (issue 10): Enhanced CT/MR and Legacy Converted Enhanced CT instances, two
phases in one multi-frame object, a series with a missing slice, a gantry-tilted series, and
a study no model rule matches. Each ends with a SEG on the source geometry (checked against
the source files read with pydicom) or a one-line refusal in `scp-node jobs`."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import DCMTK_ENV
from tests.support.enhanced import ENHANCED_MR, enhanced, legacy_converted, two_phase
from tests.support.net import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEG_TIMEOUT_S = 300


def _new_study(
    files: list[Path], folder: Path, change: Callable[[int, Dataset], None]
) -> list[Path]:
    """Copies of ``files`` as a new study and series (new SOP Instance UIDs too)."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    out = []
    for index, source in enumerate(files):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        change(index, ds)
        target = folder / f"{index:03d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def _unchanged(_: int, __: Dataset) -> None:
    return None


def _as_own_study(path: Path) -> Path:
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


def _storescu(node: Any, files: list[Path]) -> None:
    # -R: propose each file's own SOP class (the enhanced ones are not in the default list).
    result = subprocess.run(
        ["storescu", "-aec", "SCPNODE", "-xv", "-R", "127.0.0.1", str(node.port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def _study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _dciodvfy_errors(path: Path) -> list[str]:
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    output = report.stdout + report.stderr
    assert output, "dciodvfy printed nothing"
    return [line for line in output.splitlines() if "Error" in line]


def _seg_for(pacs: Any, study_uid: str) -> Path:
    (path,) = [p for p in pacs.files() if _study(p) == study_uid]
    assert _dciodvfy_errors(path) == []
    return path


def _check_on_frames(seg_path: Path, source: Path, frames: set[int]) -> None:
    """Every SEG frame lies on the multi-frame source frame it references, one of ``frames``,
    and every frame of ``frames`` is covered."""
    src = pydicom.dcmread(source, stop_before_pixels=True)
    positions = {
        number: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for number, item in enumerate(src.PerFrameFunctionalGroupsSequence, start=1)
    }
    seg = hd.seg.segread(seg_path)
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    covered = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == src.SOPInstanceUID
        number = int(reference.ReferencedFrameNumber)
        covered.add(number)
        assert np.allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            positions[number],
        )
    assert covered == frames


def _check_on_files(seg_path: Path, sources: list[Path]) -> None:
    """Every SEG frame lies on the single-frame source it references; all are covered."""
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sources}
    seg = hd.seg.segread(seg_path)
    covered = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
        source = pydicom.dcmread(by_uid[reference.ReferencedSOPInstanceUID])
        covered.add(str(reference.ReferencedSOPInstanceUID))
        assert np.allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient],
        )
        iop = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
        assert np.allclose(
            [float(v) for v in iop.ImageOrientationPatient],
            [float(v) for v in source.ImageOrientationPatient],
        )
    assert covered == set(by_uid)


def test_scanner_and_archive_shapes_end_in_a_seg_or_a_reason(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path], tmp_path: Path
) -> None:
    enhanced_ct = _as_own_study(enhanced(ct_b_files, tmp_path / "enhanced-ct.dcm"))
    legacy = _as_own_study(legacy_converted(ct_b_files, tmp_path / "legacy.dcm"))
    phases = _as_own_study(two_phase(ct_b_files, ct_b_files[3:17], tmp_path / "phases.dcm"))
    gapped = _new_study([*ct_b_files[:8], *ct_b_files[9:]], tmp_path / "gapped", _unchanged)
    angle = math.radians(6.0)

    def tilt(_: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, math.cos(angle), math.sin(angle)]

    tilted = _new_study(ct_b_files, tmp_path / "tilted", tilt)
    too_short = _new_study(ct_b_files[:5], tmp_path / "short", _unchanged)

    node = node_factory().start()
    pacs = pacs_factory(node.pacs_port)
    studies = [[enhanced_ct], [legacy], [phases], gapped, tilted, too_short]
    for files in studies:
        _storescu(node, files)

    def finished() -> bool:
        jobs = node.jobs()
        return len(jobs) == len(studies) and all(j["state"] in ("done", "failed") for j in jobs)

    wait_until(finished, SEG_TIMEOUT_S, "every study's job to end")
    jobs = {job["study_instance_uid"]: job for job in node.jobs()}

    for source in (enhanced_ct, legacy):
        job = jobs[_study(source)]
        assert (job["state"], job["outcome"]) == ("done", "seg"), job
        _check_on_frames(_seg_for(pacs, _study(source)), source, set(range(1, 21)))

    # Two phases in one object: the 20-frame phase is chosen, its frames only referenced.
    job = jobs[_study(phases)]
    assert (job["state"], job["outcome"]) == ("done", "seg"), job
    _check_on_frames(_seg_for(pacs, _study(phases)), phases, set(range(1, 21)))
    events = node.cli("logs", "--job", str(job["id"]), "--json")
    assert "(temporal position 2): 14 slices, fewer than 20" in events

    # One slice missing: segmented on the 19 slices present, the gap said in words.
    job = jobs[_study(gapped[0])]
    assert (job["state"], job["outcome"]) == ("done", "seg"), job
    _check_on_files(_seg_for(pacs, _study(gapped[0])), gapped)
    events = node.cli("logs", "--job", str(job["id"]), "--json")
    assert "1 gap of 4.0 mm in a 2.0 mm series" in events

    # Gantry tilt: SEG on the acquired (sheared) source slices.
    job = jobs[_study(tilted[0])]
    assert (job["state"], job["outcome"]) == ("done", "seg"), job
    _check_on_files(_seg_for(pacs, _study(tilted[0])), tilted)
    assert "gantry tilt" in node.cli("logs", "--job", str(job["id"]), "--json")

    # Nothing the model takes: routed to no inference at settle time (issue 11), the job
    # says why in one line, in `scp-node jobs`.
    job = jobs[_study(too_short[0])]
    assert (job["state"], job["outcome"]) == ("done", "no_matching_series"), job
    series = str(pydicom.dcmread(too_short[0], stop_before_pixels=True).SeriesInstanceUID)
    assert job["error"] == (f"no series matches: {series}: 5 frame(s) received, at least 10 needed")
    assert job["attempts"] == 0  # a refusal is not run, let alone retried
    assert len(pacs.files()) == 5


def test_enhanced_mr_instance_is_segmented_by_an_mr_model(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path], tmp_path: Path
) -> None:
    # The shipped card with its rules opened to MR: the path under test is reading an
    # Enhanced MR Image and writing its SEG, not the model's skill on MR.
    models = tmp_path / "models"
    card_dir = models / "ct-abdomen"
    card_dir.mkdir(parents=True)
    shipped = REPO_ROOT / "models" / "ct-abdomen"
    for item in shipped.iterdir():
        if item.name != "model.toml":
            (card_dir / item.name).symlink_to(item)
    card = (shipped / "model.toml").read_text()
    assert 'modalities = ["CT"]' in card
    (card_dir / "model.toml").write_text(card.replace('modalities = ["CT"]', 'modalities = ["MR"]'))
    source = _as_own_study(enhanced(ct_b_files, tmp_path / "enhanced-mr.dcm", modality="MR"))
    assert pydicom.dcmread(source, stop_before_pixels=True).SOPClassUID == ENHANCED_MR

    node = node_factory(worker={"models_dir": str(models)}).start()
    pacs = pacs_factory(node.pacs_port)
    _storescu(node, [source])
    wait_until(
        lambda: any(j["state"] in ("done", "failed") for j in node.jobs()),
        SEG_TIMEOUT_S,
        "the job to end",
    )
    (job,) = node.jobs()
    assert (job["state"], job["outcome"]) == ("done", "seg"), job
    _check_on_frames(_seg_for(pacs, _study(source)), source, set(range(1, 21)))
