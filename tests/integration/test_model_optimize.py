"""`scp-node model optimize`: an int8 ONNX Runtime variant of a bring-your-own TorchScript or
ONNX model and of our own card, calibrated on a real DICOM series, behind the agreement gate
(per-label Dice vs the fp32 source on held-out slices). A kept variant passes start-up
verification; a variant that disagrees is refused and leaves the card as it was.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from scp_node.cli import app
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.inference.verify import select_variant
from scp_node.training.optimize import agreement_dice
from tests.conftest import REPO_ROOT
from tests.integration.test_model_byo import CARD, _export

runner = CliRunner()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_optimize_byo_model_keeps_an_agreeing_int8_variant(
    fmt: str, tmp_path: Path, shared_data: Path
) -> None:
    folder = tmp_path / "byo-bright"
    folder.mkdir()
    (folder / "model.toml").write_text(CARD.format(fmt=fmt, file=_export(fmt, folder)))
    series = shared_data / "ct-abdomen-b" / "dicom"

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
        result = runner.invoke(
            app, ["model", "optimize", str(folder), "--calibration", str(series), "--slices", "4"]
        )
    assert result.exit_code == 0, result.output
    assert "variant int8-ort kept: Dice vs fp32 on 10 held-out slices: bright " in result.stdout
    spec = ModelSpec.from_model_dir(folder)
    variant = spec.variant("int8-ort")
    assert variant.format == "onnx" and variant.precision == "int8"
    assert variant.source == "fp32"
    # The card had no reference case: one is made from the held-out slices, and the new
    # variant passes start-up verification against it.
    assert spec.verify.file is not None and (folder / spec.verify.file).is_file()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
        predictor, selection = select_variant(
            spec, lambda: Predictor("cpu", threads=1), requested="int8-ort"
        )
    assert selection.verified and selection.chosen == "int8-ort" and not selection.rejected
    assert predictor.variant == "int8-ort"


def test_optimize_for_openvino_gates_and_records_the_engine(
    tmp_path: Path, shared_data: Path
) -> None:
    folder = tmp_path / "byo-bright"
    folder.mkdir()
    (folder / "model.toml").write_text(CARD.format(fmt="onnx", file=_export("onnx", folder)))
    series = shared_data / "ct-abdomen-b" / "dicom"
    command = ["model", "optimize", str(folder), "--calibration", str(series), "--slices", "4"]
    result = runner.invoke(app, [*command, "--engine", "openvino", "--engine", "ort"])
    assert result.exit_code == 0, result.output
    for name in ("int8-ov", "int8-ort"):
        assert f"variant {name} kept: Dice vs fp32 on 10 held-out slices: bright " in (
            result.stdout
        )
    spec = ModelSpec.from_model_dir(folder)
    assert spec.variant("int8-ov").engine == "openvino"
    assert spec.variant("int8-ort").engine == "ort"
    _predictor, selection = select_variant(
        spec, lambda: Predictor("cpu", threads=1), requested="int8-ov"
    )
    assert selection.verified and selection.chosen == "int8-ov" and not selection.rejected
    refused = runner.invoke(app, [*command, "--engine", "tensorrt"])
    assert refused.exit_code == 2 and "unknown engine 'tensorrt'" in refused.output


def test_gate_refuses_a_variant_that_disagrees(tmp_path: Path, shared_data: Path) -> None:
    model = tmp_path / "ct-abdomen"
    shutil.copytree(REPO_ROOT / "models" / "ct-abdomen", model)
    card_before = (model / "model.toml").read_text()
    series = shared_data / "ct-abdomen-b" / "dicom"
    # int8 moves a few boundary pixels (Dice ~0.998 vs the pruned network): a gate of 1.0
    # refuses it, names every label, and leaves the card and folder as they were.
    result = runner.invoke(
        app,
        [
            "model",
            "optimize",
            str(model),
            "--calibration",
            str(series),
            "--source",
            "pruned",
            "--name",
            "strict-int8",
            "--min-dice",
            "1.0",
            "--slices",
            "8",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "variant strict-int8 refused: Dice vs pruned on 10 held-out slices: liver 0.9" in (
        result.stdout
    )
    assert (model / "model.toml").read_text() == card_before
    assert not (model / "strict-int8.onnx").exists()


def test_agreement_dice_pools_every_label(tmp_path: Path) -> None:
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    reference = Predictor("cpu", threads=1)
    reference.load(spec, "pruned")
    inputs = [torch.rand(3, 1, 40, 40, generator=torch.Generator().manual_seed(0))]
    same = agreement_dice(reference, reference, inputs, 2)
    assert same == [1.0]

    class Flipped(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -reference.logits(x)

    flipped = Predictor("cpu", threads=1)
    flipped.load_module(Flipped(), spec)
    assert agreement_dice(reference, flipped, inputs, 2)[0] < 0.5
