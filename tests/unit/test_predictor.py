"""Preprocessing and the Predictor: contracts, loading paths, and the shipped model on B."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from scp_node.errors import ModelError
from scp_node.inference.nets import AttentionUNet
from scp_node.inference.predictor import (
    OnnxModule,
    Predictor,
    class_argmax,
    labels_from_logits,
    model_input,
)
from scp_node.inference.preprocess import (
    normalise,
    resample_inplane,
    resampled_shape,
    stack_context,
    window,
)
from scp_node.inference.registry import ModelSpec
from scp_node.training.evaluate import dicom_volume, reference_labels_on_dicom_grid
from scp_node.training.quantize import export_onnx

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "models" / "ct-abdomen"
LIVER_IN_TOTALSEGMENTATOR = 5


@pytest.fixture(scope="module")
def shipped_spec() -> ModelSpec:
    return ModelSpec.from_model_dir(SHIPPED)


def _tiny_spec(
    directory: Path, *, context: int = 0, label_value: int = 1, fmt: str = "state_dict"
) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "tiny",
            "version": "0",
            "weights": {
                "format": fmt,
                "file": "weights.pt",
                "architecture": "attention_unet",
                "params": {"in_channels": 2 * context + 1, "base_channels": 2, "depth": 2},
            },
            "input": {"spacing_mm": [3.0, 3.0], "context_slices": context},
            "labels": [
                {
                    "value": label_value,
                    "name": "thing",
                    "category": {"code": "1", "scheme": "99X", "meaning": "c"},
                    "type": {"code": "2", "scheme": "99X", "meaning": "t"},
                }
            ],
            "directory": directory,
        }
    )


def _tiny_net(context: int = 0) -> AttentionUNet:
    torch.manual_seed(0)
    return AttentionUNet(in_channels=2 * context + 1, num_classes=2, base_channels=2, depth=2)


# --- preprocess --------------------------------------------------------------------------


def test_window_maps_to_unit_range() -> None:
    hu = np.array([-1000.0, -150.0, 50.0, 250.0, 3000.0])
    out = window(hu, center=50.0, width=400.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="width"):
        window(hu, 0.0, 0.0)
    mr = normalise(np.linspace(0, 1000, 101), None, None)
    assert mr.min() == 0.0
    assert mr.max() == 1.0


def test_stack_context_replicates_edges() -> None:
    volume = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 2, 3), np.float32)
    stacked = stack_context(volume, 1)
    assert stacked.shape == (4, 3, 2, 3)
    np.testing.assert_array_equal(stacked[:, :, 0, 0], [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    assert stack_context(volume, 0).shape == (4, 1, 2, 3)


def test_resample_round_trip_keeps_registration() -> None:
    assert resampled_shape((512, 512), (0.9765625, 0.9765625), (3.0, 3.0)) == (167, 167)
    labels = np.zeros((1, 60, 90), np.uint8)
    labels[0, 20:40, 30:60] = 1
    coarse = resample_inplane(torch.from_numpy(labels), (20, 30), mode="nearest")
    assert coarse.dtype == torch.uint8
    back = resample_inplane(coarse.float().unsqueeze(1), (60, 90)).squeeze(1)
    centre = np.argwhere(back.numpy()[0] > 0.5).mean(axis=0)
    np.testing.assert_allclose(centre, [29.5, 44.5], atol=0.6)


# --- predictor ---------------------------------------------------------------------------


def test_device_choice() -> None:
    predictor = Predictor(device="cpu")
    assert predictor.device == "cpu"
    assert Predictor().device == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        Predictor(device="tpu")
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(batch_size=0)
    with pytest.raises(ModelError, match="no model loaded"):
        predictor.predict(np.zeros((2, 8, 8), np.float32), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("context", [0, 1])
def test_load_module_predicts_label_map(tmp_path: Path, context: int) -> None:
    predictor = Predictor(device="cpu", batch_size=3)
    predictor.load_module(_tiny_net(context), _tiny_spec(tmp_path, context=context))
    volume = np.random.default_rng(0).normal(40, 200, (7, 45, 61)).astype(np.float32)
    out = predictor.predict(volume, (2.0, 0.8, 1.1))
    assert out.shape == volume.shape
    assert out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1}


@pytest.mark.parametrize(("context", "window"), [(0, True), (1, True), (2, False)])
def test_batches_give_the_whole_volume_result(tmp_path: Path, context: int, window: bool) -> None:
    """Per-batch normalising, context and resampling equal the whole volume's, at any
    batch edge, for int16 and float input alike (percentiles over the whole volume)."""
    spec = _tiny_spec(tmp_path, context=context)
    if not window:  # MR-like: robust min-max over the whole volume instead of a window
        unwindowed = spec.input.model_copy(update={"window_center": None, "window_width": None})
        spec = spec.model_copy(update={"input": unwindowed})
    channels = 2 * context + 1
    net = torch.nn.Conv2d(channels, 2, kernel_size=3, padding=1).eval()
    with torch.no_grad():  # foreground where the channels' mean is above mid-range
        net.weight.copy_(
            0.01 * torch.randn(net.weight.shape, generator=torch.Generator().manual_seed(4))
        )
        net.weight[1, :, 1, 1] += 1.0
        net.bias.copy_(torch.tensor([0.0, -0.5 * channels]))
    hu = np.random.default_rng(3).normal(40, 200, (11, 40, 52)).round().astype(np.int16)
    spacing = (2.0, 0.8, 1.1)
    # The whole volume at once through the preprocessing functions themselves.
    image = normalise(hu.astype(np.float32), spec.input.window_center, spec.input.window_width)
    size = resampled_shape((40, 52), spacing[1:], spec.input.spacing_mm)
    stacked = torch.from_numpy(stack_context(image, context))
    whole_input = resample_inplane(stacked, size, antialias=True)
    torch.testing.assert_close(model_input(spec, hu, spacing), whole_input, rtol=0, atol=0)
    with torch.inference_mode():
        whole = labels_from_logits(net(whole_input), (40, 52))
    for dtype in (np.int16, np.float32):
        predictor = Predictor(device="cpu", batch_size=4)
        predictor.load_module(net, spec)
        out = predictor.predict(hu.astype(dtype), spacing)
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, whole.numpy())
    assert 0 < int(whole.sum()) < whole.numel()


@pytest.mark.parametrize("engine", ["ort", "openvino"])
@pytest.mark.parametrize("pixel_mm", [1.5, 3.0])
def test_onnx_network_running_ahead_gives_the_batch_by_batch_labels(
    tmp_path: Path, engine: str, pixel_mm: float
) -> None:
    """An ONNX network runs one batch ahead in a helper thread while the next batch is
    prepared in the other input buffer: the label map is the one of the same network run
    batch by batch, at every batch edge (11 slices in batches of 4). At 3 mm (the model
    spacing, a multiple of 4 pixels) the network reads the prepared buffer itself."""
    net = _tiny_net().eval()
    spec = _tiny_spec(tmp_path)
    hu = np.random.default_rng(5).normal(40, 200, (11, 40, 52)).round().astype(np.int16)
    spacing = (2.0, pixel_mm, pixel_mm)
    with torch.no_grad():  # the median pixel on the class boundary: labels not all 0
        logits = net(model_input(spec, hu, spacing))
        net.head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    export_onnx(net, tmp_path / "net.onnx", torch.rand(1, 1, 16, 16))
    predictor = Predictor(device="cpu", batch_size=4)
    predictor.load_module(OnnxModule(tmp_path / "net.onnx", threads=2, engine=engine), spec, 4)
    out = predictor.predict(hu, spacing)
    with torch.inference_mode():
        batches = torch.split(model_input(spec, hu, spacing), 4)
        expected = torch.cat([labels_from_logits(predictor.logits(b), (40, 52)) for b in batches])
    np.testing.assert_array_equal(out, expected.numpy())
    assert 0 < int(expected.sum()) < expected.numel()
    assert predictor.stage_s["network"] > 0


def test_label_values_above_255_give_uint16(tmp_path: Path) -> None:
    predictor = Predictor(device="cpu")
    predictor.load_module(_tiny_net(), _tiny_spec(tmp_path, label_value=300))
    with torch.no_grad():
        head = predictor._module.head  # type: ignore[union-attr]
        head.bias.copy_(torch.tensor([-10.0, 10.0]))
    out = predictor.predict(np.zeros((2, 16, 16), np.float32), (1.0, 1.0, 1.0))
    assert out.dtype == np.uint16
    assert set(np.unique(out)) == {300}


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_load_state_dict_and_torchscript(tmp_path: Path) -> None:
    net = _tiny_net().eval()
    volume = np.random.default_rng(1).normal(0, 300, (3, 30, 30)).astype(np.float32)
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    from_state = Predictor(device="cpu")
    from_state.load(_tiny_spec(tmp_path))
    expected = from_state.predict(volume, (3.0, 3.0, 3.0))

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 2, kernel_size=3, padding=1)).eval()
    in_memory = Predictor(device="cpu")
    in_memory.load_module(plain, _tiny_spec(tmp_path))
    script_dir = tmp_path / "script"
    script_dir.mkdir()
    torch.jit.save(torch.jit.script(plain), script_dir / "weights.pt")
    scripted = Predictor(device="cpu")
    scripted.load(_tiny_spec(script_dir, fmt="torchscript"))
    np.testing.assert_array_equal(
        scripted.predict(volume, (3.0, 3.0, 3.0)), in_memory.predict(volume, (3.0, 3.0, 3.0))
    )
    assert expected.shape == volume.shape


def test_load_refuses_bad_weights(tmp_path: Path) -> None:
    torch.save({"nonsense": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(ModelError, match="cannot load weights"):
        Predictor(device="cpu").load(_tiny_spec(tmp_path))
    # weights.pt is no ONNX graph: the ONNX loader says so instead of failing later.
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        Predictor(device="cpu").load(_tiny_spec(tmp_path, fmt="onnx"))


def test_shipped_model_card(shipped_spec: ModelSpec) -> None:
    assert shipped_spec.name == "ct-abdomen"
    assert [label.value for label in shipped_spec.labels] == [1]
    assert shipped_spec.labels[0].type.code == "10200004"
    assert shipped_spec.weights_path.stat().st_size < 10 * 1024 * 1024
    predictor = Predictor(device="cpu")
    predictor.load(shipped_spec)
    assert predictor.spec is shipped_spec


def test_shipped_model_segments_liver_on_subject_b(
    shipped_spec: ModelSpec, ct_b_files: list[Path], shared_data: Path
) -> None:
    datasets = [pydicom.dcmread(path) for path in ct_b_files]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume, spacing = dicom_volume(datasets)
    reference = reference_labels_on_dicom_grid(
        shared_data / "ct-abdomen-b" / "labels.nii.gz", datasets
    )
    liver_reference = reference == LIVER_IN_TOTALSEGMENTATOR
    # Mapped in physical space the reference liver is soft tissue (about +89 HU).
    assert 60 < float(volume[liver_reference].mean()) < 120

    predictor = Predictor(device="cpu", batch_size=10)
    predictor.load(shipped_spec)
    prediction = predictor.predict(volume, spacing)
    assert prediction.shape == volume.shape
    assert prediction.dtype == np.uint8
    assert set(np.unique(prediction)) <= {0, 1}
    liver = prediction == 1
    dice = 2 * (liver & liver_reference).sum() / (liver.sum() + liver_reference.sum())
    assert dice >= 0.75


@pytest.mark.parametrize("classes", [1, 2, 5])
def test_class_argmax_matches_torch_argmax_with_ties(classes: int) -> None:
    scores = torch.rand(3, classes, 17, 19, generator=torch.Generator().manual_seed(classes))
    scores[:, :, :4, :4] = 0.25  # ties resolve to the lowest class, as argmax does
    result = class_argmax(scores)
    assert result.dtype == torch.int32
    torch.testing.assert_close(result.long(), scores.argmax(dim=1))
