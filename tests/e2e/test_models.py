"""Several models on one node (`scp-node serve`, storescu in, SEGs out): each study goes to
the models whose series rules take it, a study no rule takes gets no SEG (the reason is in
`scp-node jobs`), and a broken model folder is down in /healthz while the others run."""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.e2e.conftest import DCMTK_ENV
from tests.support.enhanced import enhanced
from tests.support.models import model_folder, mr_model, thin_ct_model
from tests.support.net import wait_for_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SEG_TIMEOUT_S = 400
LABEL_WITHOUT_CODE = {'type = { code = "10200004", scheme = "SCT", meaning = "Liver" }\n': ""}


def _new_study(files: list[Path], folder: Path) -> list[Path]:
    """Copies of ``files`` as a new study and series."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
    return out


def _study(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _series(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _healthz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_two_models_route_studies_and_a_broken_one_is_down(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    model_folder(models, "ct-abdomen")
    thin_ct_model(models)  # CT, 1-3 mm, description matching /body/: takes the CT study too
    mr_model(models)  # MR only
    broken = model_folder(models, "broken", replace=LABEL_WITHOUT_CODE)
    ct = _new_study(ct_b_files, tmp_path / "ct")
    short = _new_study(ct_b_files[:5], tmp_path / "short")  # too few slices for anyone
    mr = enhanced(ct_b_files, tmp_path / "mr.dcm", modality="MR")
    ds = pydicom.dcmread(mr)
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(mr, enforce_file_format=True)

    node = node_factory(
        worker={
            "models": ["ct-abdomen", "ct-thin", "mr-liver", "broken"],
            "models_dir": str(models),
            "max_loaded_models": 2,
        }
    )
    web_port = tomllib.loads(node.config.read_text())["web"]["port"]
    node.start()
    wait_for_port(web_port, timeout_s=60)
    pacs = pacs_factory(node.pacs_port)

    # Once start-up is done, the broken folder is down, named with its file and key; the
    # others are up. (Until then /healthz fails its "start-up" check.)
    status, health = wait_until(
        lambda: (answer := _healthz(web_port))[1]["checks"]["start-up"]["ok"] and answer,
        60,
        "the node to finish starting",
    )
    assert status == 503
    assert health["checks"]["model broken"]["ok"] is False
    detail = health["checks"]["model broken"]["detail"]
    assert str(broken / "model.toml") in detail and "labels.0.type: Field required" in detail
    for name in ("ct-abdomen", "ct-thin", "mr-liver"):
        # Up: its card is valid ("ready"), or it is already loaded and verified (the first
        # worker.max_loaded_models models load at start-up, while the dashboard is up).
        check = health["checks"][f"model {name}"]
        assert check["ok"] is True and check["detail"] in ("ready", "loaded"), check

    result = subprocess.run(
        ["storescu", "-aec", "SCPNODE", "-xv", "-R", "127.0.0.1", str(node.port)]
        + [str(f) for f in [*ct, *short, mr]],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr

    def finished() -> list[dict[str, Any]]:
        jobs = [j for j in node.jobs() if j["model"] != "broken"]
        ended = [j for j in jobs if j["state"] in ("done", "failed")]
        return jobs if len(jobs) == 9 and len(ended) == 9 else []

    jobs = wait_until(finished, SEG_TIMEOUT_S, "the jobs of three studies x three models")
    by = {(j["study_instance_uid"], j["model"]): j for j in jobs}
    taken = {
        (_study(ct[0]), "ct-abdomen"),
        (_study(ct[0]), "ct-thin"),
        (_study(mr), "mr-liver"),
    }
    for key, job in by.items():
        if key in taken:
            assert (job["state"], job["outcome"]) == ("done", "seg"), job
        else:
            assert (job["state"], job["outcome"], job["attempts"]) == (
                "done",
                "no_matching_series",
                0,
            ), job
            assert job["error"].startswith("no series matches: "), job
    assert by[(_study(ct[0]), "mr-liver")]["error"] == (
        f"no series matches: {_series(ct[0])}: modality CT is not one of MR"
    )
    assert by[(_study(short[0]), "ct-abdomen")]["error"] == (
        f"no series matches: {_series(short[0])}: 5 frame(s) received, at least 10 needed"
    )
    assert by[(_study(mr), "ct-abdomen")]["error"] == (
        f"no series matches: {_series(mr)}: modality MR is not one of CT"
    )
    # The broken model's jobs wait for a worker that serves it; nothing ran them.
    waiting = [j for j in node.jobs() if j["model"] == "broken"]
    assert sorted(j["state"] for j in waiting) == ["queued"] * 3

    # One SEG per (series, model, version), each with its own UIDs and its model's labels.
    segs = wait_until(lambda: pacs.files() if len(pacs.files()) == 3 else [], 120, "3 SEGs")
    read = [hd.seg.segread(path) for path in segs]
    assert len({s.SeriesInstanceUID for s in read}) == 3
    assert len({s.SOPInstanceUID for s in read}) == 3
    found = {
        (str(s.StudyInstanceUID), str(s.SeriesDescription), s.SegmentSequence[0].SegmentLabel)
        for s in read
    }
    assert found == {
        (_study(ct[0]), "AI abdomen segmentation", "liver"),
        (_study(ct[0]), "AI thin", "liver"),
        (_study(mr), "AI MR liver", "liver (MR)"),
    }

    # `scp-node jobs` shows the model (the reasons are its --json error, checked above).
    listing = node.cli("jobs")
    for name in ("ct-abdomen", "ct-thin", "mr-liver", "broken"):
        assert f" {name} " in listing
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/jobs", timeout=30) as page:
        html = page.read().decode()
    assert "<td>mr-liver</td>" in html and "<td>ct-thin</td>" in html

    # `scp-node rules test` says the same from the files, with the worker's selection code.
    folder = tmp_path / "study-folder"
    shutil.copytree(tmp_path / "ct", folder)
    report = json.loads(node.cli("rules", "test", str(folder), "--json"))
    assert report["models"]["ct-abdomen"]["chosen"] == _series(ct[0])
    assert report["models"]["ct-thin"]["chosen"] == _series(ct[0])
    assert report["models"]["mr-liver"]["routed"] is False
    assert "labels.0.type" in report["models"]["broken"]["down"]


def test_shipped_liver_and_spleen_models_each_send_their_seg(
    node_factory: Any, pacs_factory: Any, ct_b_files: list[Path]
) -> None:
    """The two shipped cards from the repository's models/: one CT study, two SEGs, each
    with its own organ, code and colour, over the same source images."""
    node = node_factory(worker={"models": ["ct-abdomen", "ct-spleen"], "max_loaded_models": 2})
    node.start()
    pacs = pacs_factory(node.pacs_port)
    node.storescu(ct_b_files)

    segs = wait_until(
        lambda: pacs.files() if len(pacs.files()) == 2 else [], SEG_TIMEOUT_S, "2 SEGs"
    )
    read = {str(s.SeriesDescription): s for s in (hd.seg.segread(path) for path in segs)}
    assert set(read) == {"AI abdomen segmentation", "AI spleen segmentation"}
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct_b_files}
    expected = {
        "AI abdomen segmentation": ("liver", "10200004"),
        "AI spleen segmentation": ("spleen", "78961009"),
    }
    for description, seg in read.items():
        (segment,) = seg.SegmentSequence
        label, code = expected[description]
        assert segment.SegmentLabel == label
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == code
        assert seg.StudyInstanceUID == _study(ct_b_files[0])
        # Both organs are in B's 20 slices: every frame points at one of its images.
        assert seg.NumberOfFrames > 0
        referenced = {
            str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for frame in seg.PerFrameFunctionalGroupsSequence
        }
        assert referenced <= sources
    colours = {
        d: tuple(s.SegmentSequence[0].RecommendedDisplayCIELabValue) for d, s in read.items()
    }
    assert len(set(colours.values())) == 2  # the two overlays are told apart in a viewer
    jobs = node.jobs()
    assert {j["model"]: j["outcome"] for j in jobs} == {"ct-abdomen": "seg", "ct-spleen": "seg"}
    # Both cards keep their organ's largest component; on B the spleen network leaves an
    # island of about 2,250 voxels away from the spleen, and the job's log says it went.
    (spleen_job,) = (j for j in jobs if j["model"] == "ct-spleen")
    shown = json.loads(node.cli("jobs", "show", str(spleen_job["id"]), "--json"))
    (inference,) = (
        e for e in shown["events"] if e["stage"] == "inference" and e["duration_s"] is not None
    )
    assert 1000 < inference["data"]["removed_voxels"]["spleen"] < 5000
