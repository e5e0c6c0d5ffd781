"""The attention U-Net and the architecture registry."""

from __future__ import annotations

import pytest
import torch

from scp_node.errors import ModelError
from scp_node.inference.nets import (
    ARCHITECTURES,
    ASPP,
    AttentionGate,
    AttentionUNet,
    DeepLabV3Plus,
    build_network,
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("height", "width"), [(37, 53), (64, 64), (1, 9), (100, 33)])
@pytest.mark.parametrize("depth", [2, 4])
def test_output_shape_any_input_size(height: int, width: int, depth: int) -> None:
    net = AttentionUNet(in_channels=1, num_classes=3, base_channels=4, depth=depth).eval()
    with torch.inference_mode():
        out = net(torch.rand(2, 1, height, width))
    assert out.shape == (2, 3, height, width)


def test_three_input_channels_for_2_5d() -> None:
    net = AttentionUNet(in_channels=3, num_classes=2, base_channels=4, depth=3).eval()
    with torch.inference_mode():
        out = net(torch.rand(1, 3, 45, 50))
    assert out.shape == (1, 2, 45, 50)
    with pytest.raises(RuntimeError):
        net(torch.rand(1, 1, 45, 50))


def test_encoder_downsamples_to_the_bottleneck() -> None:
    net = AttentionUNet(in_channels=1, num_classes=2, base_channels=4, depth=3).eval()
    seen: list[tuple[int, ...]] = []
    net.bottleneck.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    with torch.inference_mode():
        net(torch.rand(1, 1, 64, 48))
    assert seen == [(1, 32, 8, 6)]


def test_attention_gates_gate_every_skip() -> None:
    net = AttentionUNet(in_channels=1, num_classes=2, base_channels=4, depth=3).eval()
    gates = net.attention_gates
    assert len(gates) == 3
    assert all(isinstance(gate, AttentionGate) for gate in gates)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    skip = torch.rand(2, 4, 16, 16)
    gating = torch.rand(2, 4, 16, 16)
    gate = gates[-1].eval()
    with torch.inference_mode():
        alpha = gate.attention(skip, gating)
        gated = gate(skip, gating)
    assert alpha.shape == (2, 1, 16, 16)
    assert float(alpha.min()) > 0.0
    assert float(alpha.max()) < 1.0
    torch.testing.assert_close(gated, skip * alpha)


def test_gradients_reach_every_parameter() -> None:
    net = AttentionUNet(in_channels=1, num_classes=2, base_channels=4, depth=3).train()
    logits = net(torch.rand(2, 1, 40, 40))
    target = torch.randint(0, 2, (2, 40, 40))
    torch.nn.functional.cross_entropy(logits, target).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    first = net.encoders[0][0].weight.grad
    assert first is not None
    assert float(first.abs().sum()) > 0


def test_build_network_by_name() -> None:
    assert ARCHITECTURES["attention_unet"] is AttentionUNet
    net = build_network("attention_unet", {"base_channels": 4, "depth": 2})
    assert isinstance(net, AttentionUNet)


def test_build_network_unknown_name_or_bad_params() -> None:
    with pytest.raises(ModelError, match="unknown architecture"):
        build_network("resnet9000", {})
    with pytest.raises(ModelError, match="bad params"):
        build_network("attention_unet", {"colour": "blue"})
    with pytest.raises(ModelError, match="depth"):
        build_network("attention_unet", {"depth": 0})


@pytest.mark.parametrize(("height", "width"), [(37, 53), (64, 64), (5, 9)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_deeplab_output_shape_any_size_and_context(
    height: int, width: int, in_channels: int
) -> None:
    net = DeepLabV3Plus(in_channels=in_channels, num_classes=4, base_channels=4, aspp_channels=8)
    with torch.inference_mode():
        out = net.eval()(torch.rand(2, in_channels, height, width))
    assert out.shape == (2, 4, height, width)


def test_deeplab_aspp_keeps_resolution_and_fuses_branches() -> None:
    aspp = ASPP(8, 6, rates=(2, 3)).eval()
    with torch.inference_mode():
        out = aspp(torch.rand(1, 8, 12, 10))
    assert out.shape == (1, 6, 12, 10)
    assert len(aspp.branches) == 3  # 1x1 + two dilated 3x3 (+ image pooling)


def test_deeplab_registered_and_learns_a_toy_task() -> None:
    net = build_network("deeplabv3plus", {"in_channels": 1, "num_classes": 2, "base_channels": 4})
    assert isinstance(net, DeepLabV3Plus)
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 1.0
    target = (x[:, 0] > 0.5).long()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(x), target)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    # Judged in training mode: 30 steps are too few for batch-norm running statistics.
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == target).float().mean()
    assert accuracy > 0.95


def test_unet_explicit_widths() -> None:
    net = AttentionUNet(in_channels=1, num_classes=2, depth=2, widths=(3, 5, 7)).eval()
    assert net.widths == (3, 5, 7)
    with torch.inference_mode():
        assert net(torch.rand(1, 1, 20, 22)).shape == (1, 2, 20, 22)
    with pytest.raises(ValueError, match="widths"):
        AttentionUNet(depth=2, widths=(3, 5))
