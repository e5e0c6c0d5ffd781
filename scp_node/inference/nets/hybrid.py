"""Hybrid 2-D + 3-D network: a 2-D attention U-Net per slice, a small 3-D context head.

The notes' "hybrid 2-D + 3-D design" in its simplest trainable form: every axial slice of
a 3-D patch goes through a 2-D attention U-Net (shared weights, slices folded into the
batch) that outputs a few feature maps per pixel; a 3-D convolutional head then looks at
those features together with the image across neighbouring slices and gives the class
logits. It is one module taking a volume, so it is trained, exported and run like any 3-D
network (the volume runtime's sliding window).
"""

from __future__ import annotations

import torch
from torch import nn

from scp_node.inference.nets._checks import require_positive
from scp_node.inference.nets.attention_unet import AttentionUNet

__all__ = ["HybridUNet"]


class HybridUNet(nn.Module):
    """2-D attention U-Net features per slice + a 3-D context head.

    Parameters
    ----------
    in_channels
        Image channels (1 for CT).
    num_classes
        Output channels (logits), background included.
    base_channels, depth
        Of the 2-D attention U-Net (see :class:`AttentionUNet`).
    features
        Feature maps the 2-D network hands to the 3-D head, per pixel.
    head_channels
        Channels of the two 3x3x3 convolutions of the head.

    Notes
    -----
    ``forward`` takes (batch, in_channels, z, y, x) float32 and returns (batch,
    num_classes, z, y, x) logits; y and x are padded inside the 2-D network when they are
    not a multiple of ``2**depth``.

    Raises
    ------
    ValueError
        A size argument is smaller than 1.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        base_channels: int = 8,
        depth: int = 3,
        features: int = 8,
        head_channels: int = 16,
    ) -> None:
        super().__init__()
        require_positive(features=features, head_channels=head_channels)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.slice_net = AttentionUNet(in_channels, features, base_channels, depth)
        self.head = nn.Sequential(
            nn.Conv3d(features + in_channels, head_channels, kernel_size=3, padding=1),
            nn.InstanceNorm3d(head_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(head_channels, head_channels, kernel_size=3, padding=1),
            nn.InstanceNorm3d(head_channels, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(head_channels, num_classes, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, depth, height, width = x.shape
        slices = x.permute(0, 2, 1, 3, 4).reshape(batch * depth, channels, height, width)
        features = self.slice_net(slices)
        features = features.reshape(batch, depth, -1, height, width).permute(0, 2, 1, 3, 4)
        logits: torch.Tensor = self.head(torch.cat([features, x], dim=1))
        return logits
