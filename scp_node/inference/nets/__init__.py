"""Network architectures, looked up by the name a model card gives."""

from __future__ import annotations

from typing import Any

from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.nets.attention_unet import AttentionGate, AttentionUNet
from scp_node.inference.nets.deeplab import ASPP, DeepLabV3Plus
from scp_node.inference.nets.hybrid import HybridUNet

__all__ = [
    "ARCHITECTURES",
    "ASPP",
    "AttentionGate",
    "AttentionUNet",
    "DeepLabV3Plus",
    "HybridUNet",
    "build_network",
]

#: Architecture name (``weights.architecture`` in a model card) -> module class.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "attention_unet": AttentionUNet,
    "deeplabv3plus": DeepLabV3Plus,
    "hybrid_unet": HybridUNet,
}


def build_network(name: str, params: dict[str, Any]) -> nn.Module:
    """Instantiate architecture ``name`` with keyword arguments ``params``.

    Parameters
    ----------
    name
        A key of :data:`ARCHITECTURES`.
    params
        Keyword arguments of the architecture's constructor.

    Returns
    -------
    torch.nn.Module
        A freshly initialised network in training mode, on the CPU.

    Raises
    ------
    ModelError
        ``name`` is unknown, or ``params`` does not fit the constructor.
    """
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {name!r} (known: {known})") from None
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"architecture {name!r}: bad params {params!r}: {exc}") from exc
