"""Structured pruning, FLOP counting, static int8 (torch FX and ONNX Runtime QDQ), model
card variants and the device -> variant choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.nets import AttentionUNet, DeepLabV3Plus
from scp_node.inference.predictor import OnnxModule, Predictor, autocast_dtype
from scp_node.inference.registry import ModelSpec, WeightsSpec
from scp_node.training.prune import count_flops, prune_attention_unet, pruned_widths
from scp_node.training.quantize import export_onnx, quantize_fx, quantize_onnx
from scp_node.training.variants import set_runtime, write_variant

CARD = """
name = "tiny"
version = "1"

[weights]
format = "state_dict"
file = "weights.pt"
architecture = "attention_unet"
params = { in_channels = 1, num_classes = 2, base_channels = 8, depth = 2 }

[input]
spacing_mm = [3.0, 3.0]

[[labels]]
value = 1
name = "bright"
category = { code = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }
type = { code = "10200004", scheme = "SCT", meaning = "Liver" }

[metrics]
# a comment that must survive card edits
dice = 0.5
"""


def _trained_like(net: nn.Module) -> nn.Module:
    """Random weights with distinct batch-norm statistics, so channels differ in importance."""
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=generator) + 0.05
            module.bias.data = torch.randn(n, generator=generator) * 0.1
            module.running_mean = torch.randn(n, generator=generator) * 0.1
            module.running_var = torch.rand(n, generator=generator) + 0.5
    return net.eval()


@pytest.fixture
def net() -> AttentionUNet:
    torch.manual_seed(0)
    model = _trained_like(AttentionUNet(in_channels=1, num_classes=2, base_channels=8, depth=2))
    assert isinstance(model, AttentionUNet)
    return model


@pytest.fixture
def model_dir(tmp_path: Path, net: AttentionUNet) -> Path:
    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "model.toml").write_text(CARD)
    torch.save(net.state_dict(), directory / "weights.pt")
    return directory


def test_pruning_nothing_keeps_the_function(net: AttentionUNet) -> None:
    same = prune_attention_unet(net, 0.0)
    x = torch.rand(2, 1, 36, 44)
    with torch.inference_mode():
        torch.testing.assert_close(same(x), net(x))


def test_pruning_removes_channels_and_flops(net: AttentionUNet) -> None:
    pruned = prune_attention_unet(net, 0.5)
    assert pruned.widths == (4, 8, 16) == pruned_widths(net.widths, 0.5)
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * sum(
        p.numel() for p in net.parameters()
    )
    before, after = count_flops(net, 64, 64), count_flops(pruned, 64, 64)
    assert 0.2 < after / before < 0.3  # conv FLOPs scale with in x out channels
    with torch.inference_mode():
        assert pruned(torch.rand(1, 1, 37, 29)).shape == (1, 2, 37, 29)
    # The original is untouched.
    assert net.widths == (8, 16, 32)


def test_pruning_keeps_the_most_important_channels(net: AttentionUNet) -> None:
    first_bn = net.encoders[0][1]
    assert isinstance(first_bn, nn.BatchNorm2d)
    strongest = int(first_bn.weight.abs().argmax())
    pruned = prune_attention_unet(net, 0.5)
    kept_bn = pruned.encoders[0][1]
    assert isinstance(kept_bn, nn.BatchNorm2d)
    assert float(first_bn.weight.detach()[strongest]) in kept_bn.weight.tolist()


def test_pruning_refuses_other_architectures_and_bad_ratios(net: AttentionUNet) -> None:
    with pytest.raises(ModelError, match="attention_unet"):
        prune_attention_unet(DeepLabV3Plus(base_channels=4, aspp_channels=8), 0.5)
    with pytest.raises(ValueError, match="ratio"):
        prune_attention_unet(net, 1.0)


def test_flop_count_of_one_conv() -> None:
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    assert count_flops(conv, 10, 10, in_channels=3) == 2 * 5 * 10 * 10 * 3 * 3 * 3


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
def test_fx_int8_is_close_to_fp32_and_loads_from_a_card(
    net: AttentionUNet, model_dir: Path
) -> None:
    calibration = [torch.rand(4, 1, 48, 48) for _ in range(3)]
    int8 = quantize_fx(net, calibration, model_dir / "int8.pt", engine="x86")
    x = torch.rand(2, 1, 48, 64)
    with torch.inference_mode():
        reference, quantized = net(x), int8(x)
    assert quantized.shape == reference.shape
    assert _agreement(reference, quantized) > 0.9
    spec = write_variant(
        model_dir,
        "int8",
        WeightsSpec(
            format="torchscript",
            file="int8.pt",
            pad_multiple=4,
            quantized_engine="x86",
            precision="int8",
        ),
    )
    assert spec.variants["int8"].quantized_engine == "x86"
    predictor = Predictor("cpu")
    predictor.load(spec, "int8")
    assert predictor.variant == "int8"
    with torch.inference_mode():
        via_predictor = predictor.logits(x[..., :47, :61])  # padded to 48x64 inside
    assert via_predictor.shape == (2, 2, 47, 61)


def test_onnx_export_matches_and_int8_qdq_is_close(net: AttentionUNet, tmp_path: Path) -> None:
    example = torch.rand(1, 1, 32, 32)
    export_onnx(net, tmp_path / "fp32.onnx", example)
    fp32 = OnnxModule(tmp_path / "fp32.onnx", threads=1)
    x = torch.rand(3, 1, 40, 56)  # dynamic batch, height and width
    with torch.inference_mode():
        reference = net(x)
        torch.testing.assert_close(fp32(x), reference, rtol=1e-4, atol=1e-4)
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", [torch.rand(4, 1, 32, 32)])
    int8 = OnnxModule(tmp_path / "int8.onnx", threads=1)
    assert _agreement(reference, int8(x)) > 0.9
    with pytest.raises(ModelError, match="cannot load ONNX"):
        OnnxModule(tmp_path / "fp32.onnx.missing")


def test_openvino_engine_runs_the_same_files(net: AttentionUNet, tmp_path: Path) -> None:
    export_onnx(net, tmp_path / "fp32.onnx", torch.rand(1, 1, 32, 32))
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", [torch.rand(4, 1, 32, 32)])
    fp32 = OnnxModule(tmp_path / "fp32.onnx", threads=1, engine="openvino")
    int8 = OnnxModule(tmp_path / "int8.onnx", threads=1, engine="openvino")
    with torch.inference_mode():
        # Sizes and batches change between calls (each size is compiled on first use).
        for x in (torch.rand(3, 1, 40, 56), torch.rand(1, 1, 32, 32), torch.rand(2, 1, 40, 56)):
            reference = net(x)
            torch.testing.assert_close(fp32(x), reference, rtol=1e-4, atol=1e-4)
            assert _agreement(reference, int8(x)) > 0.9
    with pytest.raises(ModelError, match="cannot read"):
        OnnxModule(tmp_path / "fp32.onnx.missing", engine="openvino")
    with pytest.raises(ModelError, match="unknown engine"):
        OnnxModule(tmp_path / "fp32.onnx", engine="tensorrt")


def test_openvino_streams_split_a_batch_with_the_same_logits(
    net: AttentionUNet, tmp_path: Path
) -> None:
    """Two streams run a batch as two parts at once (the last part zero-padded to the
    compiled part size): the logits are those of one stream running the whole batch."""
    export_onnx(net, tmp_path / "fp32.onnx", torch.rand(1, 1, 32, 32))
    quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", [torch.rand(4, 1, 32, 32)])
    for file in ("fp32.onnx", "int8.onnx"):
        one = OnnxModule(tmp_path / file, threads=2, engine="openvino", streams=1)
        two = OnnxModule(tmp_path / file, threads=2, engine="openvino", streams=2)
        with torch.inference_mode():
            for x in (torch.rand(4, 1, 40, 56), torch.rand(3, 1, 40, 56), torch.rand(1, 1, 40, 56)):
                torch.testing.assert_close(two(x), one(x), rtol=1e-5, atol=1e-5)


def test_card_variants_and_runtime_choice(model_dir: Path, net: AttentionUNet) -> None:
    pruned = prune_attention_unet(net, 0.5)
    torch.save(pruned.state_dict(), model_dir / "pruned.pt")
    params = {"in_channels": 1, "num_classes": 2, "depth": 2, "widths": list(pruned.widths)}
    spec = write_variant(
        model_dir,
        "pruned",
        WeightsSpec(
            format="state_dict", file="pruned.pt", architecture="attention_unet", params=params
        ),
    )
    assert "a comment that must survive" in (model_dir / "model.toml").read_text()
    assert spec.variant_for("cpu") == "fp32"
    spec = set_runtime(model_dir, cpu="pruned", cuda="fp32", cuda_autocast="bf16")
    assert spec.variant_for("cpu") == "pruned"
    assert spec.variant_for("cuda") == "fp32"
    # Writing the same variant again replaces its table instead of adding a second one.
    spec = write_variant(
        model_dir,
        "pruned",
        WeightsSpec(
            format="state_dict",
            file="pruned.pt",
            architecture="attention_unet",
            params=params,
            precision="fp32",
        ),
    )
    assert (model_dir / "model.toml").read_text().count("[variants.pruned]") == 1

    predictor = Predictor("cpu")
    predictor.load(spec)  # no variant named: the card's choice for the CPU
    assert predictor.variant == "pruned"
    labels = predictor.predict(np.full((2, 40, 40), 100.0, np.float32), (3.0, 1.5, 1.5))
    assert labels.shape == (2, 40, 40)
    with pytest.raises(ModelError, match="no variant 'nope'"):
        predictor.load(spec, "nope")


def test_card_refuses_bad_variants(model_dir: Path) -> None:
    card = model_dir / "model.toml"
    text = card.read_text()
    card.write_text(text + '\n[runtime]\ncpu = "missing"\n')
    with pytest.raises(ModelError, match=r"runtime\.cpu names unknown variant"):
        ModelSpec.from_model_dir(model_dir)
    card.write_text(text + '\n[variants.int8]\nformat = "onnx"\nfile = "absent.onnx"\n')
    with pytest.raises(ModelError, match=r"variant 'int8': file .*absent.onnx not found"):
        ModelSpec.from_model_dir(model_dir)
    card.write_text(text + '\n[variants.fp32]\nformat = "onnx"\nfile = "weights.pt"\n')
    with pytest.raises(ModelError, match="reserved"):
        ModelSpec.from_model_dir(model_dir)
    with pytest.raises(ModelError, match="bad variant name"):
        write_variant(model_dir, "fp32", WeightsSpec(format="onnx", file="x.onnx"))


def test_autocast_choice_for_cuda() -> None:
    # The CUDA path's dtype choice, exercised without a GPU.
    assert autocast_dtype("auto", bf16_supported=True) is torch.bfloat16
    assert autocast_dtype("auto", bf16_supported=False) is torch.float16
    assert autocast_dtype("fp16", bf16_supported=True) is torch.float16
    assert autocast_dtype("none", bf16_supported=True) is None
    with pytest.raises(ValueError, match="cuda_autocast"):
        autocast_dtype("fp8", bf16_supported=True)
    predictor = Predictor("cpu")
    assert predictor.autocast_dtype is None  # never on the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_agrees_with_fp32(model_dir: Path) -> None:
    spec = ModelSpec.from_model_dir(model_dir)
    cpu, cuda = Predictor("cpu"), Predictor("cuda")
    cpu.load(spec)
    cuda.load(spec)
    assert cuda.autocast_dtype in (torch.bfloat16, torch.float16)
    volume = np.random.default_rng(0).normal(50, 100, (4, 64, 64)).astype(np.float32)
    agree = (cpu.predict(volume, (3, 3, 3)) == cuda.predict(volume, (3, 3, 3))).mean()
    assert agree > 0.98
