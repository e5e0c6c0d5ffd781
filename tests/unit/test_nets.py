"""The attention U-Net and the architecture registry."""

from __future__ import annotations

import pytest
import torch

from scp_node.errors import ModelError
from scp_node.inference.nets import ARCHITECTURES, AttentionGate, AttentionUNet, build_network


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
