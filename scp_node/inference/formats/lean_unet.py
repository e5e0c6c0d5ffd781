"""An nnU-Net U-Net's inference forward pass at a fraction of the peak memory.

``dynamic_network_architectures``' own forward keeps every encoder output (skip) until the
decoder returns, keeps each decoder stage's concatenated input while the stage runs, and
hands oneDNN whole full-resolution tensors, which it copies into its blocked layout on the
way in and out. For the 3 mm TotalSegmentator-shaped network (32 channels at 112x112x128)
one window then costs about +1.35 GiB on the CPU.

:class:`LeanUNet` runs the same modules with the same weights in the same order, but

* drops each tensor as soon as the next layer has consumed it (skips included),
* runs every convolution in slabs along the first spatial axis (each slab with the halo
  its kernel needs, zeros at the volume's edges as the layer's own padding), so oneDNN's
  layout copies are slab-sized, and
* never builds a decoder stage's concatenated input, nor its upsampled input: each slab of
  the first convolution reads its slice of the skip and upsamples the planes it needs of
  the lower stage's output (nnU-Net's transposed convolutions have kernel = stride, so a
  plane of their output depends on one input plane).

The result is the network's own, up to float rounding (oneDNN may pick another kernel for a
slab's shape). Anything it does not recognise (other layers, gradients on, tracing for
export, a GPU) runs the wrapped network's own ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LeanUNet"]

#: Largest input slab (bytes) one convolution step reads.
SLAB_BYTES = 48 * 2**20


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    """The layers of a stage in the order its ``forward`` applies them."""
    from dynamic_network_architectures.building_blocks.simple_conv_blocks import (
        ConvDropoutNormReLU,
        StackedConvBlocks,
    )

    if isinstance(module, nn.Sequential):
        for child in module:
            yield from _leaves(child)
    elif isinstance(module, StackedConvBlocks):
        yield from _leaves(module.convs)
    elif isinstance(module, ConvDropoutNormReLU):
        yield from _leaves(module.all_modules)
    else:
        yield module


def _sliceable(conv: nn.Module) -> bool:
    """A convolution :func:`_conv_slabs` computes slab by slab."""
    if isinstance(conv, nn.Conv3d):
        return (
            conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and conv.dilation[0] == 1
        )
    if isinstance(conv, nn.ConvTranspose3d):
        return (
            conv.kernel_size[0] == conv.stride[0]
            and conv.padding[0] == 0
            and conv.output_padding[0] == 0
            and conv.dilation[0] == 1
        )
    return False


def _normalisable(norm: nn.Module) -> bool:
    """An instance norm :func:`_instance_norm_` applies in place."""
    return isinstance(norm, nn.InstanceNorm3d) and not norm.track_running_stats


def _instance_norm_(norm: nn.InstanceNorm3d, x: torch.Tensor, slab_bytes: int) -> torch.Tensor:
    """``norm(x)`` written over ``x``, a few channels at a time.

    Instance norm treats every channel alone (its own mean and variance), so a group of
    channels through torch's own kernel gives those channels' part of the whole result; only
    a group-sized temporary is made instead of a second ``x``.
    """
    channels = int(x.shape[1])
    plane = x[:, :1].numel() * x.element_size()
    group = max(1, min(channels, slab_bytes // max(1, plane)))
    for c0 in range(0, channels, group):
        c1 = min(channels, c0 + group)
        x[:, c0:c1] = F.instance_norm(
            x[:, c0:c1],
            weight=None if norm.weight is None else norm.weight[c0:c1],
            bias=None if norm.bias is None else norm.bias[c0:c1],
            use_input_stats=True,
            momentum=0.0,
            eps=norm.eps,
        )
    return x


class _Upsampled:
    """A transposed convolution's output (kernel = stride, no padding, as nnU-Net's
    decoders), computed a few planes at a time when read: never whole in memory."""

    def __init__(self, conv: nn.ConvTranspose3d, lower: torch.Tensor) -> None:
        self.conv, self.lower = conv, lower
        n, _, d, h, w = (int(v) for v in lower.shape)
        sd, sh, sw = conv.stride
        self.shape = torch.Size((n, conv.out_channels, d * sd, h * sh, w * sw))

    @staticmethod
    def fits(conv: nn.Module) -> bool:
        return (
            isinstance(conv, nn.ConvTranspose3d)
            and tuple(conv.kernel_size) == tuple(conv.stride)
            and not any(conv.padding)
            and not any(conv.output_padding)
            and tuple(conv.dilation) == (1, 1, 1)
        )

    def planes(self, first: int, last: int) -> torch.Tensor:
        """Output planes ``first:last`` along the first spatial axis."""
        stride = self.conv.stride[0]
        low, high = first // stride, -(-last // stride)
        y: torch.Tensor = self.conv(self.lower[:, :, low:high])
        return y[:, :, first - low * stride : last - low * stride]


def _planes(part: torch.Tensor | _Upsampled, first: int, last: int) -> torch.Tensor:
    return part.planes(first, last) if isinstance(part, _Upsampled) else part[:, :, first:last]


def _whole(part: torch.Tensor | _Upsampled) -> torch.Tensor:
    return part.planes(0, int(part.shape[2])) if isinstance(part, _Upsampled) else part


def _conv_slabs(
    conv: nn.Conv3d | nn.ConvTranspose3d,
    parts: list[torch.Tensor | _Upsampled],
    slab_bytes: int,
) -> torch.Tensor:
    """``conv`` of the channel-wise concatenation of ``parts`` (N, C, D, H, W), in slabs of
    output planes along D. ``parts`` is emptied (its tensors freed once read)."""
    depth = int(parts[0].shape[2])
    channels = sum(int(p.shape[1]) for p in parts)
    rows, columns = int(parts[0].shape[3]), int(parts[0].shape[4])
    in_plane = channels * rows * columns * 4
    padding = [int(p) for p in conv.padding]  # never "same"/"valid": see _sliceable
    kernel, stride, pad = conv.kernel_size[0], conv.stride[0], padding[0]
    # Bytes of one output plane (in-plane strides shrink it, a transpose's grow it).
    in_plane_stride = conv.stride[1] * conv.stride[2]
    out_plane = conv.out_channels * rows * columns * 4
    if isinstance(conv, nn.ConvTranspose3d):
        out_depth = depth * stride
        # Input planes per step: each makes ``stride`` output planes.
        step = max(1, slab_bytes // (in_plane + stride * out_plane * in_plane_stride))
    else:
        out_depth = (depth + 2 * pad - kernel) // stride + 1
        # Output planes per step: each reads ``stride`` more input planes.
        step = max(1, slab_bytes // (stride * in_plane + out_plane // in_plane_stride))
    if step >= (depth if isinstance(conv, nn.ConvTranspose3d) else out_depth):
        # One slab: the layer itself on the whole input.
        whole = torch.cat([_whole(p) for p in parts], 1) if parts[1:] else _whole(parts[0])
        parts.clear()
        return conv(whole)  # type: ignore[no-any-return]
    out: torch.Tensor | None = None
    for o0 in range(0, out_depth if isinstance(conv, nn.Conv3d) else depth, step):
        if isinstance(conv, nn.ConvTranspose3d):
            i0, i1 = o0, min(depth, o0 + step)
            slab = (
                torch.cat([_planes(p, i0, i1) for p in parts], 1)
                if parts[1:]
                else _planes(parts[0], i0, i1)
            )
            y = conv(slab)
            first, last = i0 * stride, i1 * stride
        else:
            first, last = o0, min(out_depth, o0 + step)
            # Input planes this slab of outputs reads, zeros outside the volume.
            i0, i1 = first * stride - pad, (last - 1) * stride - pad + kernel
            a, b = max(0, i0), min(depth, i1)
            if len(parts) == 1 and (a, b) == (i0, i1):
                slab = _planes(parts[0], a, b)  # a view of a tensor: no copy of our own
            else:
                shape = (parts[0].shape[0], channels, i1 - i0, rows, columns)
                slab = torch.empty(shape, dtype=torch.float32)
                slab[:, :, : a - i0].zero_()
                slab[:, :, b - i0 :].zero_()
                c0 = 0
                for p in parts:
                    slab[:, c0 : c0 + p.shape[1], a - i0 : b - i0] = _planes(p, a, b)
                    c0 += int(p.shape[1])
            y = F.conv3d(
                slab,
                conv.weight,
                conv.bias,
                (stride, *conv.stride[1:]),
                (0, padding[1], padding[2]),
                conv.dilation,
                conv.groups,
            )
        del slab
        if out is None:
            out = y.new_empty((y.shape[0], y.shape[1], out_depth, *y.shape[3:]))
        out[:, :, first:last] = y
        del y
    parts.clear()
    assert out is not None
    return out


class LeanUNet(nn.Module):
    """Wraps a ``PlainConvUNet`` / ``ResidualEncoderUNet`` (no deep supervision) and runs its
    inference forward with little memory (see the module's docstring).

    Parameters
    ----------
    network
        The network; its own ``forward`` runs whenever the lean one does not apply.
    slab_bytes
        Largest input slab (bytes) per convolution step.
    norm_in_place
        Write instance norms over their input (a few channels at a time) instead of into a
        new tensor: one more copy per norm, and no lower peak for nnU-Net's U-Nets (a
        decoder stage's first convolution, upsampled input + skip + output, is the peak).
    """

    def __init__(
        self, network: nn.Module, slab_bytes: int = SLAB_BYTES, *, norm_in_place: bool = False
    ) -> None:
        super().__init__()
        self.network: Any = network
        self.slab_bytes = slab_bytes
        self.norm_in_place = norm_in_place

    def _applies(self, x: torch.Tensor) -> bool:
        decoder = getattr(self.network, "decoder", None)
        return (
            x.device.type == "cpu"
            and x.dim() == 5
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and torch._C._get_tracing_state() is None  # not being traced for export
            and decoder is not None
            and not getattr(decoder, "deep_supervision", True)
            and hasattr(self.network, "encoder")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._applies(x):
            return self.network(x)  # type: ignore[no-any-return]
        return self._forward([x])

    def _run(self, stage: nn.Module, held: list[torch.Tensor | _Upsampled]) -> torch.Tensor:
        """``stage`` applied to the tensor(s) in ``held`` (channel-wise concatenated),
        layer by layer, each input dropped once consumed; ``held`` is emptied."""
        x: torch.Tensor | None = None
        for layer in _leaves(stage):
            if self.norm_in_place and x is not None and _normalisable(layer):
                x = _instance_norm_(layer, x, self.slab_bytes)  # type: ignore[arg-type]
            elif _sliceable(layer):
                parts = held if x is None else [x]
                x = None
                x = _conv_slabs(layer, parts, self.slab_bytes)  # type: ignore[arg-type]
            else:
                if x is None:
                    x = torch.cat([_whole(p) for p in held], 1) if held[1:] else _whole(held[0])
                    held.clear()
                x = layer(x)
        if x is None:  # an empty stage
            x = torch.cat([_whole(p) for p in held], 1) if held[1:] else _whole(held[0])
            held.clear()
        return x

    def _encode(self, held: list[torch.Tensor | _Upsampled]) -> list[torch.Tensor]:
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import (
            PlainConvEncoder,
        )

        encoder = self.network.encoder
        if not isinstance(encoder, PlainConvEncoder):
            # Residual blocks add their input back: their own forward, skips as usual.
            skips: list[torch.Tensor] = encoder(_whole(held.pop()))
            return skips
        skips = []
        for stage in encoder.stages:
            skip = self._run(stage, held)
            skips.append(skip)
            held = [skip]  # the list now holds the stage's input no more
            del skip
        return skips

    def _forward(self, x: list[torch.Tensor | _Upsampled]) -> torch.Tensor:
        skips = self._encode(x)
        decoder = self.network.decoder
        lower: list[torch.Tensor | _Upsampled] = [skips.pop()]
        for transpose, stage in zip(decoder.transpconvs, decoder.stages, strict=True):
            up: torch.Tensor | _Upsampled
            if _Upsampled.fits(transpose) and _sliceable(next(_leaves(stage))):
                # Upsampled slab by slab as the stage's first convolution reads it.
                up = _Upsampled(transpose, _whole(lower.pop()))
            else:
                up = self._run(transpose, lower)
            held: list[torch.Tensor | _Upsampled] = [up, skips.pop()]
            del up  # no name holds the upsampled tensor or the skip: the first conv frees them
            lower = [self._run(stage, held)]
        return self._run(decoder.seg_layers[-1], lower)
