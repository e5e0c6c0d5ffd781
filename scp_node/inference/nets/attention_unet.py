"""A 2-D attention U-Net (Oktay et al., 2018, "Attention U-Net: learning where to look").

Encoder levels of two conv-BN-ReLU blocks with max-pooling between them, a bottleneck, a
decoder that upsamples bilinearly (then convolves) and concatenates skip features gated by
additive attention gates, and a 1x1 head producing per-class logits.

Bilinear upsampling + convolution is used instead of ``ConvTranspose2d`` on purpose: the
int8 quantisation path of transposed convolutions is unreliable, and the CPU deployment
variant of the node is quantised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scp_node.inference.nets._checks import require_positive

__all__ = ["AttentionGate", "AttentionUNet", "ConvBlock"]


class ConvBlock(nn.Sequential):
    """Two (3x3 conv, batch norm, ReLU) blocks; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class AttentionGate(nn.Module):
    """Additive attention gate: weights skip features ``x`` by a map computed from ``x``
    and the coarser gating signal ``g``.

    ``alpha = sigmoid(psi(relu(W_x x + W_g g)))`` and the output is ``x * alpha``, where
    ``g`` has already been brought to the spatial size of ``x``.

    Parameters
    ----------
    skip_channels
        Channels of the skip features ``x``.
    gate_channels
        Channels of the gating signal ``g``.
    inter_channels
        Channels of the intermediate (joint) space.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_x = nn.Sequential(
            nn.Conv2d(skip_channels, inter_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(inter_channels),
        )
        self.w_g = nn.Sequential(
            nn.Conv2d(gate_channels, inter_channels, kernel_size=1, bias=True),
            nn.BatchNorm2d(inter_channels),
        )
        self.psi = nn.Sequential(
            nn.Conv2d(inter_channels, 1, kernel_size=1, bias=True),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )
        self.relu = nn.ReLU(inplace=True)

    def attention(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention coefficients, shape (batch, 1, H, W) with values in (0, 1)."""
        return self.psi(self.relu(self.w_x(x) + self.w_g(g)))  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``x`` (batch, skip_channels, H, W) and ``g`` (batch, gate_channels, H, W)."""
        return x * self.attention(x, g)


class _UpBlock(nn.Module):
    """Bilinear x2 upsampling + 3x3 conv, attention-gated skip, concatenation, ConvBlock."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.gate = AttentionGate(skip_channels, out_channels, max(out_channels // 2, 1))
        self.conv = ConvBlock(skip_channels + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x)
        gated = self.gate(skip, up)
        return self.conv(torch.cat([gated, up], dim=1))  # type: ignore[no-any-return]


class AttentionUNet(nn.Module):
    """2-D attention U-Net for slice-wise segmentation.

    Parameters
    ----------
    in_channels
        Input channels: 1 for plain 2-D, ``2 * context_slices + 1`` for 2.5-D input.
    num_classes
        Output channels (logits), background included.
    base_channels
        Channels of the first encoder level; each deeper level doubles them.
    depth
        Number of 2x downsamplings (encoder levels before the bottleneck).
    widths
        Channels per level (``depth + 1`` values, the last one the bottleneck's); when
        given it replaces ``base_channels * 2**level``. Structured pruning
        (:mod:`scp_node.training.prune`) produces such narrower networks.

    Notes
    -----
    ``forward`` takes (batch, in_channels, H, W) float32 and returns (batch, num_classes,
    H, W) logits for any H, W: inputs that are not a multiple of ``2**depth`` are
    zero-padded (bottom/right) inside and the logits are cropped back.

    Raises
    ------
    ValueError
        A size argument is smaller than 1.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 16,
        depth: int = 4,
        widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        require_positive(
            in_channels=in_channels,
            num_classes=num_classes,
            base_channels=base_channels,
            depth=depth,
        )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        if widths is None:
            channels = [base_channels * 2**level for level in range(depth + 1)]
        else:
            channels = [int(w) for w in widths]
            if len(channels) != depth + 1 or min(channels) < 1:
                raise ValueError(
                    f"widths must be {depth + 1} values >= 1 (depth + 1), got {list(widths)}"
                )
        self.widths = tuple(channels)
        self.encoders = nn.ModuleList()
        previous = in_channels
        for level in range(depth):
            self.encoders.append(ConvBlock(previous, channels[level]))
            previous = channels[level]
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = ConvBlock(channels[depth - 1], channels[depth])
        self.decoders = nn.ModuleList(
            _UpBlock(channels[level + 1], channels[level], channels[level])
            for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(channels[0], num_classes, kernel_size=1)

    @property
    def attention_gates(self) -> list[AttentionGate]:
        """The attention gates, from the deepest skip connection to the shallowest."""
        return [m for m in self.modules() if isinstance(m, AttentionGate)]

    @property
    def size_multiple(self) -> int:
        """Input height and width that need no padding are multiples of this."""
        return int(2**self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = self.size_multiple
        pad_h = (-height) % multiple
        pad_w = (-width) % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.forward_padded(x)[..., :height, :width]

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for input whose height and width are multiples of :attr:`size_multiple`.

        Free of shape-dependent Python control flow, so FX tracing, TorchScript tracing
        and ONNX export (with dynamic height/width) see one graph.
        """
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for decoder, skip in zip(self.decoders, reversed(skips), strict=True):
            x = decoder(x, skip)
        logits: torch.Tensor = self.head(x)
        return logits
