"""A small DeepLabv3+ (Chen et al., 2018, "Encoder-decoder with atrous separable convolution").

A light residual backbone trained from scratch (no downloaded weights) reaches output
stride 8 (three stride-2 stages; the fourth stage keeps the resolution and uses dilation 2),
an ASPP module (1x1 conv, three dilated 3x3 convs, image pooling) on its output, and the
v3+ decoder: the ASPP features are upsampled bilinearly to stride 2, concatenated with
reduced low-level features, refined by two 3x3 convs, and upsampled to the input size.

Upsampling is bilinear (no ``ConvTranspose2d``), for the same int8 reason as the U-Net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scp_node.inference.nets._checks import require_positive

__all__ = ["ASPP", "DeepLabV3Plus"]


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, dilation: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel,
            stride=stride,
            padding=dilation * (kernel // 2),
            dilation=dilation,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """Basic residual block: two 3x3 convs, a 1x1 projection when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, out_channels, stride=stride, dilation=dilation),
            nn.Conv2d(
                out_channels,
                out_channels,
                kernel_size=3,
                padding=dilation,
                dilation=dilation,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        )
        self.project: nn.Module = (
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.project(x))  # type: ignore[no-any-return]


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel 1x1, dilated 3x3 and image-pooling branches.

    Parameters
    ----------
    in_channels, out_channels
        Channels in, and of each branch and the fused output.
    rates
        Dilation rates of the 3x3 branches.
    """

    def __init__(
        self, in_channels: int, out_channels: int, rates: tuple[int, ...] = (2, 4, 6)
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, kernel=1)]
            + [_conv_bn_relu(in_channels, out_channels, dilation=rate) for rate in rates]
        )
        self.image_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.ReLU(inplace=True),
        )
        self.fuse = _conv_bn_relu(out_channels * (len(rates) + 2), out_channels, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, out_channels, H, W)."""
        pooled = self.image_pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])
        features = [branch(x) for branch in self.branches] + [pooled]
        return self.fuse(torch.cat(features, dim=1))  # type: ignore[no-any-return]


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ for slice-wise segmentation with a light residual backbone.

    Parameters
    ----------
    in_channels
        1 for plain 2-D, ``2 * context_slices + 1`` for 2.5-D input.
    num_classes
        Output channels (logits), background included.
    base_channels
        Channels of the stem; the four backbone stages have 1x, 2x, 4x, 4x of them.
    aspp_channels
        Channels of each ASPP branch and of the decoder.

    Notes
    -----
    ``forward`` takes (batch, in_channels, H, W) and returns (batch, num_classes, H, W) for
    any H, W (padded inside to a multiple of 8, cropped back).

    Raises
    ------
    ValueError
        A size argument is smaller than 1.
    """

    #: Output stride of the backbone.
    size_multiple = 8

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 16,
        aspp_channels: int = 64,
    ) -> None:
        super().__init__()
        require_positive(
            in_channels=in_channels,
            num_classes=num_classes,
            base_channels=base_channels,
            aspp_channels=aspp_channels,
        )
        self.in_channels = in_channels
        self.num_classes = num_classes
        c = base_channels
        self.stem = _conv_bn_relu(in_channels, c)
        self.stage1 = _Residual(c, c, stride=2, dilation=1)  # stride 2: low-level features
        self.stage2 = _Residual(c, 2 * c, stride=2, dilation=1)  # stride 4
        self.stage3 = _Residual(2 * c, 4 * c, stride=2, dilation=1)  # stride 8
        self.stage4 = _Residual(4 * c, 4 * c, stride=1, dilation=2)  # stride 8, atrous
        self.aspp = ASPP(4 * c, aspp_channels)
        low = max(aspp_channels // 4, 1)
        self.reduce = _conv_bn_relu(c, low, kernel=1)
        self.decoder = nn.Sequential(
            _conv_bn_relu(aspp_channels + low, aspp_channels),
            _conv_bn_relu(aspp_channels, aspp_channels),
        )
        self.head = nn.Conv2d(aspp_channels, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pad_h = (-height) % self.size_multiple
        pad_w = (-width) % self.size_multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.forward_padded(x)[..., :height, :width]

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for input whose height and width are multiples of 8 (traceable)."""
        low = self.stage1(self.stem(x))
        deep = self.aspp(self.stage4(self.stage3(self.stage2(low))))
        deep = F.interpolate(deep, scale_factor=4.0, mode="bilinear", align_corners=False)
        fused = self.decoder(torch.cat([deep, self.reduce(low)], dim=1))
        logits: torch.Tensor = self.head(fused)
        return F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False)
