"""A per-series model on a running node: the first series of a study is segmented and its SEG
delivered while the study is still arriving (the study's own settle wait is ten minutes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text

from tests.support.models import SHIPPED_SERIES, model_folder
from tests.support.net import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _series_copy(files: list[Path], folder: Path, study: str) -> tuple[str, list[Path]]:
    """Copies of ``files`` as a new series of ``study``."""
    folder.mkdir()
    series = generate_uid()
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
    return series, out


def _jobs(db_url: str) -> list[tuple[Any, ...]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [
                tuple(row)
                for row in conn.execute(
                    text("SELECT series_instance_uid, state, outcome FROM jobs ORDER BY id")
                )
            ]
    finally:
        engine.dispose()


def _referenced_series(seg: Path) -> str:
    ds = pydicom.dcmread(seg, stop_before_pixels=True)
    return str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID)


def test_a_series_is_segmented_and_delivered_before_its_study_ends(
    tmp_path: Path, ct_b_files: list[Path], node_factory: Any, pacs_factory: Any
) -> None:
    models = tmp_path / "models"
    model_folder(
        models, "ct-series", replace={SHIPPED_SERIES: SHIPPED_SERIES + "per_series = true\n"}
    )
    study = generate_uid()
    first, first_files = _series_copy(ct_b_files, tmp_path / "first", study)
    second, second_files = _series_copy(ct_b_files, tmp_path / "second", study)
    node = node_factory(
        worker={"models": ["ct-series"], "models_dir": str(models)},
        settle={"quiet_s": 600.0, "series_quiet_s": 1.0, "poll_s": 0.2},
    )
    node.start()
    pacs = pacs_factory(node.pacs_port)
    db_url = f"sqlite:///{node.root / 'node.db'}"

    node.storescu(first_files)
    # The PACS holds the SEG a moment before the dispatcher records the job done.
    wait_until(
        lambda: len(pacs.files()) == 1 and _jobs(db_url)[-1][1] == "done",
        400,
        "the first series' SEG at the PACS and its job done",
    )
    assert [_referenced_series(p) for p in pacs.files()] == [first]
    assert _jobs(db_url) == [(first, "done", "seg")]

    # The study goes on arriving: its second series gets its own job and SEG.
    node.storescu(second_files)
    wait_until(
        lambda: len(pacs.files()) == 2 and all(job[1] == "done" for job in _jobs(db_url)),
        400,
        "the second series' SEG at the PACS and its job done",
    )
    assert sorted(_referenced_series(p) for p in pacs.files()) == sorted([first, second])
    assert _jobs(db_url) == [(first, "done", "seg"), (second, "done", "seg")]
