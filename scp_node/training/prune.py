"""Structured channel pruning of the attention U-Net.

Whole channels are removed, so the pruned network is a smaller dense network (an
:class:`AttentionUNet` with narrower ``widths``) that needs fewer FLOPs on any hardware;
masks that zero weights in place would save nothing. A channel's importance is the
magnitude of the batch-norm scale that follows its convolution (network slimming, Liu et
al., 2017); the channels kept in each group are the most important ones, and every layer
that reads a pruned group has its input channels sliced to match (encoder skips feed both
the attention gate and the decoder's concatenation). Fine-tuning afterwards recovers most
of the accuracy (see :func:`scp_node.training.train.train`'s ``network`` argument).
"""

from __future__ import annotations

import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.nets import AttentionUNet
from scp_node.inference.nets.attention_unet import AttentionGate, ConvBlock, _UpBlock

__all__ = ["count_flops", "prune_attention_unet", "pruned_widths"]


def pruned_widths(widths: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """Channels per level kept when ``ratio`` of them is removed (at least 1 each).

    Raises
    ------
    ValueError
        ``ratio`` is not in [0, 1).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    return tuple(max(1, round(w * (1.0 - ratio))) for w in widths)


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest scores, in ascending index order."""
    return torch.sort(torch.topk(scores, keep).indices).values


def _bn_importance(bn: nn.Module) -> torch.Tensor:
    assert isinstance(bn, nn.BatchNorm2d)
    return bn.weight.detach().abs()


def _copy_conv(
    dst: nn.Module, src: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None
) -> None:
    assert isinstance(dst, nn.Conv2d) and isinstance(src, nn.Conv2d)
    weight = src.weight.detach()
    if out_idx is not None:
        weight = weight[out_idx]
    if in_idx is not None:
        weight = weight[:, in_idx]
    dst.weight.data.copy_(weight)
    if src.bias is not None and dst.bias is not None:
        bias = src.bias.detach()
        dst.bias.data.copy_(bias[out_idx] if out_idx is not None else bias)


def _copy_bn(dst: nn.Module, src: nn.Module, idx: torch.Tensor | None) -> None:
    assert isinstance(dst, nn.BatchNorm2d) and isinstance(src, nn.BatchNorm2d)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(src, name).detach()
        getattr(dst, name).data.copy_(value[idx] if idx is not None else value)


def _prune_block(
    dst: ConvBlock, src: ConvBlock, in_idx: torch.Tensor | None, width: int
) -> torch.Tensor:
    """Copy a ConvBlock keeping ``width`` channels in both convs; returns the kept outputs."""
    mid = _top(_bn_importance(src[1]), width)
    out = _top(_bn_importance(src[4]), width)
    _copy_conv(dst[0], src[0], mid, in_idx)
    _copy_bn(dst[1], src[1], mid)
    _copy_conv(dst[3], src[3], out, mid)
    _copy_bn(dst[4], src[4], out)
    return out


def _prune_gate(
    dst: AttentionGate, src: AttentionGate, skip_idx: torch.Tensor, gate_idx: torch.Tensor
) -> None:
    conv = dst.w_x[0]
    assert isinstance(conv, nn.Conv2d)
    keep = conv.out_channels
    scores = _bn_importance(src.w_x[1]) + _bn_importance(src.w_g[1])
    inter = _top(scores, keep)
    _copy_conv(dst.w_x[0], src.w_x[0], inter, skip_idx)
    _copy_bn(dst.w_x[1], src.w_x[1], inter)
    _copy_conv(dst.w_g[0], src.w_g[0], inter, gate_idx)
    _copy_bn(dst.w_g[1], src.w_g[1], inter)
    _copy_conv(dst.psi[0], src.psi[0], None, inter)
    _copy_bn(dst.psi[1], src.psi[1], None)


@torch.no_grad()
def prune_attention_unet(net: nn.Module, ratio: float) -> AttentionUNet:
    """A narrower copy of ``net`` with ``ratio`` of the channels of every level removed.

    Parameters
    ----------
    net
        A trained :class:`AttentionUNet` (left unchanged).
    ratio
        Fraction of channels to remove per level, in [0, 1); 0.5 halves every width
        (about a quarter of the FLOPs).

    Returns
    -------
    AttentionUNet
        A new network, in eval mode, built with ``widths`` = the kept channel counts; its
        constructor parameters are ``in_channels``, ``num_classes``, ``depth`` and
        ``widths``. With ``ratio = 0`` it computes exactly what ``net`` computes.

    Raises
    ------
    ModelError
        ``net`` is not an :class:`AttentionUNet` (only that architecture can be pruned).
    ValueError
        ``ratio`` is out of range.
    """
    if not isinstance(net, AttentionUNet):
        raise ModelError(
            f"structured pruning supports attention_unet only, not {type(net).__name__}"
        )
    widths = pruned_widths(net.widths, ratio)
    pruned = AttentionUNet(
        in_channels=net.in_channels,
        num_classes=net.num_classes,
        depth=net.depth,
        widths=widths,
    )
    previous: torch.Tensor | None = None
    skips: list[torch.Tensor] = []
    for level, (dst_enc, src_enc) in enumerate(zip(pruned.encoders, net.encoders, strict=True)):
        assert isinstance(dst_enc, ConvBlock) and isinstance(src_enc, ConvBlock)
        previous = _prune_block(dst_enc, src_enc, previous, widths[level])
        skips.append(previous)
    previous = _prune_block(pruned.bottleneck, net.bottleneck, previous, widths[net.depth])
    for index, (dst_dec, src_dec) in enumerate(zip(pruned.decoders, net.decoders, strict=True)):
        assert isinstance(dst_dec, _UpBlock) and isinstance(src_dec, _UpBlock)
        level = net.depth - 1 - index
        skip_idx = skips[level]
        up_idx = _top(_bn_importance(src_dec.up[2]), widths[level])
        _copy_conv(dst_dec.up[1], src_dec.up[1], up_idx, previous)
        _copy_bn(dst_dec.up[2], src_dec.up[2], up_idx)
        _prune_gate(dst_dec.gate, src_dec.gate, skip_idx, up_idx)
        concat_idx = torch.cat([skip_idx, up_idx + net.widths[level]])
        previous = _prune_block(dst_dec.conv, src_dec.conv, concat_idx, widths[level])
    _copy_conv(pruned.head, net.head, None, previous)
    return pruned.eval()


def count_flops(net: nn.Module, height: int, width: int, in_channels: int | None = None) -> int:
    """Multiply-accumulates x 2 of the convolutions and linear layers for one input slice.

    Counted with forward hooks on one (1, C, height, width) input; element-wise work
    (batch norm, activations, resampling) is left out, as is usual.

    Parameters
    ----------
    net
        Any module taking (batch, channels, height, width).
    height, width
        The slice size at the model's spacing.
    in_channels
        Channels of the input; default ``net.in_channels``.

    Returns
    -------
    int
        Floating-point operations (2 per multiply-accumulate).
    """
    channels = in_channels if in_channels is not None else int(getattr(net, "in_channels", 1))
    total = 0

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            total += 2 * int(output.numel()) * int(kernel)
        elif isinstance(module, nn.Linear):
            total += 2 * int(output.numel()) * module.in_features

    handles = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = net.training
    try:
        net.eval()
        with torch.inference_mode():
            net(torch.zeros(1, channels, height, width))
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return total
