"""The torch device a runtime runs on, from the ``worker.device`` setting."""

from __future__ import annotations

import torch

__all__ = ["torch_device"]


def torch_device(device: str, threads: int = 0) -> torch.device:
    """Resolve ``device`` (``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:<n>"``).

    ``"auto"`` is CUDA when torch sees a GPU, else the CPU. With ``threads`` > 0 torch's CPU
    thread count is set too (it is process-wide).

    Raises
    ------
    ValueError
        ``device`` names no known device kind, or CUDA is asked for but unavailable.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for but CUDA is not available")
    elif device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.device(device)
