"""`scp-node rules test STUDY_DIR`: which model takes which series of a folder, and why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
from typer.testing import CliRunner

from scp_node.cli import app
from tests.support.config import write_config
from tests.support.models import model_folder, mr_model, thin_ct_model
from tests.support.net import free_port

runner = CliRunner()


def test_rules_test_shows_which_model_takes_which_series(
    ct_b_files: list[Path], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    model_folder(models, "ct-abdomen")
    mr_model(models)
    thin_ct_model(models, "ct-thick").joinpath("model.toml").write_text(
        (models / "ct-thick" / "model.toml")
        .read_text()
        .replace("slice_thickness_mm = [1.0, 3.0]", "slice_thickness_mm = [4.0, 6.0]")
    )
    model_folder(models, "broken", link_weights=False)
    config = write_config(
        tmp_path,
        free_port(),
        free_port(),
        worker={
            "models": ["ct-abdomen", "mr-liver", "ct-thick", "broken"],
            "models_dir": str(models),
        },
    )
    study = tmp_path / "study"
    study.mkdir()
    for path in ct_b_files:
        shutil.copy(path, study / path.name)
    (study / "notes.txt").write_text("not DICOM")
    series = str(pydicom.dcmread(ct_b_files[0], stop_before_pixels=True).SeriesInstanceUID)

    result = runner.invoke(app, ["rules", "test", str(study), "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"ct-abdomen 0.2.0: takes series {series}" in lines
    assert f"  {series}: chosen" in lines
    assert (
        f"mr-liver 0.2.0: no job: no series matches: {series}: modality CT is not one of MR"
        in lines
    )
    assert f"  {series}: modality CT is not one of MR" in lines
    assert f"  {series}: slice thickness 3 mm outside [4, 6] mm" in lines
    assert any(line.startswith("broken: model down: ") and "weights file" in line for line in lines)
    assert any(line.startswith("file refused notes.txt: ") for line in lines)

    only = runner.invoke(
        app, ["rules", "test", str(study), "--config", str(config), "-m", "ct-abdomen", "--json"]
    )
    assert only.exit_code == 0, only.output
    report = json.loads(only.output)
    assert list(report["models"]) == ["ct-abdomen"]
    found = report["models"]["ct-abdomen"]
    assert (found["routed"], found["chosen"], found["reason"]) == (True, series, None)
    assert found["summary"].startswith(f"chose {series}: 20 slices")

    missing = runner.invoke(
        app, ["rules", "test", str(tmp_path / "nowhere"), "--config", str(config)]
    )
    assert missing.exit_code == 2 and "is not a folder" in missing.output
