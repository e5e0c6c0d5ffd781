"""LeanUNet: an nnU-Net U-Net's own forward, recomputed slab by slab with less memory."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from scp_node.inference.formats.lean_unet import LeanUNet


def _network(kind: str, strides: list[list[int]], kernels: list[list[int]]) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import (
        PlainConvUNet,
        ResidualEncoderUNet,
    )

    stages = len(strides)
    common: dict[str, object] = {
        "input_channels": 1,
        "n_stages": stages,
        "features_per_stage": [4 * 2**i for i in range(stages)],
        "conv_op": nn.Conv3d,
        "kernel_sizes": kernels,
        "strides": strides,
        "num_classes": 3,
        "n_conv_per_stage_decoder": [2] * (stages - 1),
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
        "deep_supervision": False,
    }
    torch.manual_seed(0)
    if kind == "plain":
        network: nn.Module = PlainConvUNet(n_conv_per_stage=[2] * stages, **common)
    else:
        network = ResidualEncoderUNet(n_blocks_per_stage=[1] * stages, **common)
    for parameter in network.parameters():  # norms away from 1 and 0, as after training
        nn.init.normal_(parameter, std=0.5)
    return network.eval()


@pytest.mark.parametrize(
    ("kind", "strides", "kernels"),
    [
        # nnU-Net's 3d_fullres shape: 2x2x2 strides then an in-plane-only last one.
        ("plain", [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 4),
        # Anisotropic: 1x3x3 kernels and no pooling along the first axis at first.
        ("plain", [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]]),
        ("residual", [[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 3),
    ],
)
@pytest.mark.parametrize(
    ("slab_bytes", "norm_in_place"), [(1, False), (40_000, True), (40_000, False), (2**30, True)]
)
def test_lean_forward_is_the_networks_own(
    kind: str,
    strides: list[list[int]],
    kernels: list[list[int]],
    slab_bytes: int,
    norm_in_place: bool,
) -> None:
    network = _network(kind, strides, kernels)
    x = torch.randn(2, 1, 24, 16, 32, generator=torch.Generator().manual_seed(1))
    lean = LeanUNet(network, slab_bytes=slab_bytes, norm_in_place=norm_in_place)
    with torch.inference_mode():
        expected = network(x)
        got = lean(x)
    assert got.shape == expected.shape == (2, 3, 24, 16, 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_lean_forward_leaves_the_input_alone() -> None:
    network = _network("plain", [[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    before = x.clone()
    with torch.inference_mode():
        LeanUNet(network, slab_bytes=1)(x)
    assert torch.equal(x, before)


def test_gradients_and_tracing_run_the_networks_own_forward() -> None:
    network = _network("plain", [[1, 1, 1], [2, 2, 2]], [[3, 3, 3]] * 2)
    lean = LeanUNet(network, slab_bytes=1)
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    lean(x).sum().backward()  # the lean path would not keep the graph
    assert x.grad is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced: Any = torch.jit.trace(lean, torch.zeros(1, 1, 16, 16, 16))  # type: ignore[no-untyped-call]
    # Tracing (ONNX export) saw the network's own forward, not the slab loop.
    assert "new_zeros" not in str(traced.inlined_graph)
    with torch.inference_mode():
        torch.testing.assert_close(traced(x.detach()), network(x.detach()))
