"""`scp-node model train | prune | quantize | evaluate | export` on a tiny model and the
real data (subject A trains, subject B evaluates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scp_node.cli import app
from scp_node.inference.registry import ModelSpec
from tests.unit.test_training import TINY_MODEL_TOML, TINY_TRAIN_TOML

runner = CliRunner()


@pytest.mark.slow
def test_model_commands_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "train.toml").write_text(TINY_TRAIN_TOML)
    (model / "model.toml").write_text(TINY_MODEL_TOML)
    data = ["--data-dir", str(shared_data)]

    result = runner.invoke(app, ["model", "train", str(model), *data, "--seed", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["model", "prune", str(model), *data, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "FLOPs/slice" in result.output
    result = runner.invoke(
        app, ["model", "quantize", str(model), *data, "--method", "ort", "--slices", "4"]
    )
    assert result.exit_code == 0, result.output
    spec = ModelSpec.from_model_dir(model)
    assert set(spec.variants) == {"pruned", "pruned-onnx", "pruned-int8-ort"}

    result = runner.invoke(
        app,
        ["model", "evaluate", str(model), *data, "--variant", "fp32", "--variant", "pruned"],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert set(scores) == {"fp32", "pruned"}
    assert 0.0 <= scores["fp32"]["dice_liver"] <= 1.0
    assert scores["fp32"]["slices"] == 20

    # A folder without train.toml (an nnU-Net folder, a 3-D compare row) names the
    # reference file's values itself; the same scores come out.
    (model / "train.toml").rename(tmp_path / "train.toml")
    evaluate_fp32 = ["model", "evaluate", str(model), *data, "--variant", "fp32"]
    result = runner.invoke(app, evaluate_fp32)
    assert result.exit_code == 2
    assert "--label NAME=VALUE" in result.output
    result = runner.invoke(app, [*evaluate_fp32, "--label", "liver"])
    assert result.exit_code == 2
    assert "expected NAME=VALUE" in result.output
    result = runner.invoke(app, [*evaluate_fp32, "--label", "liver=5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["fp32"]["dice_liver"] == scores["fp32"]["dice_liver"]
    (tmp_path / "train.toml").rename(model / "train.toml")

    out = tmp_path / "export"
    result = runner.invoke(
        app, ["model", "export", str(model), str(out), "--variant", "pruned", "--format", "onnx"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "pruned.onnx").stat().st_size > 0


def test_model_commands_report_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["model", "prune", str(tmp_path / "absent")])
    assert result.exit_code == 2
    assert "no model.toml" in result.output
    (tmp_path / "m").mkdir()
    result = runner.invoke(app, ["model", "export", str(tmp_path / "m"), str(tmp_path / "o")])
    assert result.exit_code == 2
