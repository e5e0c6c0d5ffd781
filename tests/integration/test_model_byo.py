"""Bring your own model: a TorchScript or ONNX file plus a ``model.toml`` card in a model
folder, run by the node's own path (series -> Predictor -> SEG) with no code change.

The model is exported by the test itself: a fixed 1x1 convolution that marks pixels
brighter than the middle of the CT window (a known answer the test computes on its own).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import torch
from torch import nn

from scp_node.dicom.volume import load_volume
from scp_node.errors import ModelError
from scp_node.inference.predictor import Predictor
from scp_node.inference.preprocess import window
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation

CARD = """
name = "byo-bright"
version = "2024.1"
description = "A hospital's own model: pixels above the window centre."
series_description = "BYO bright"

[weights]
format = "{fmt}"
file = "{file}"
pad_multiple = 1

[input]
modality = "CT"
spacing_mm = [0.9765625, 0.9765625]
window_center = 50.0
window_width = 400.0
context_slices = 1

[series]
modalities = ["CT"]
min_slices = 5

[[labels]]
value = 7
name = "bright"
color = [255, 255, 0]
category = {{ code = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }}
type = {{ code = "10200004", scheme = "SCT", meaning = "Liver" }}
"""


class _Bright(nn.Module):
    """(N, 3, H, W) -> logits (N, 2, H, W): class 1 where the centre channel > 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 1] = 100.0  # the slice itself is channel 1 of 3
            self.conv.bias.copy_(torch.tensor([0.0, -50.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # type: ignore[no-any-return]


def _export(fmt: str, directory: Path) -> str:
    module = _Bright().eval()
    example = torch.rand(1, 3, 16, 16)
    with warnings.catch_warnings():
        # torch 2.13 deprecates both exporters used here; they still write valid files.
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "onnx":
            torch.onnx.export(
                module,
                (example,),
                str(directory / "model.onnx"),
                input_names=["image"],
                output_names=["scores"],
                dynamic_axes={
                    "image": {0: "n", 2: "h", 3: "w"},
                    "scores": {0: "n", 2: "h", 3: "w"},
                },
                dynamo=False,
            )
            return "model.onnx"
        torch.jit.save(torch.jit.script(module), str(directory / "model.pt"))
        return "model.pt"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_own_model_runs_through_the_worker_path(
    fmt: str, tmp_path: Path, ct_b_files: list[Path]
) -> None:
    folder = tmp_path / "models" / "byo-bright"
    folder.mkdir(parents=True)
    file = _export(fmt, folder)
    (folder / "model.toml").write_text(CARD.format(fmt=fmt, file=file))

    spec = ModelSpec.from_model_dir(folder)
    predictor = Predictor("auto", threads=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated")
        predictor.load(spec)
    volume = load_volume(ct_b_files)
    labels = predictor.predict(volume.array, volume.spacing_zyx)
    expected = window(volume.array, 50.0, 400.0) > 0.5
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 7}
    # Exact up to pixels within float rounding of the threshold.
    assert np.mean((labels == 7) == expected) > 0.9999

    seg = build_segmentation(volume, labels, spec, software_version="test")
    assert seg is not None
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    back = hd.seg.segread(io.BytesIO(buffer.getvalue()))
    assert back.get_segment_description(1).segment_label == "bright"
    assert back.SeriesDescription == "BYO bright"
    masks = back.get_pixels_by_source_instance(
        [str(ds.SOPInstanceUID) for ds in volume.datasets], segment_numbers=[1]
    )
    np.testing.assert_array_equal(masks[..., 0] > 0, labels == 7)


def test_own_model_with_wrong_output_is_refused_clearly(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"not an onnx graph")
    (folder / "model.toml").write_text(CARD.format(fmt="onnx", file="model.onnx"))
    spec = ModelSpec.from_model_dir(folder)
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        Predictor("cpu").load(spec)
