"""The tiny liver model the training tests train: a 2-level attention U-Net with 2 base
channels, subject A's liver (TotalSegmentator value 5) at 6 mm. Each test module adds its
own ``[train]`` section (step counts, crop size) and, for the comparison runner, metrics."""

from __future__ import annotations

from pathlib import Path

#: train.toml up to its ``[train]`` header: data, labels, network and input.
TRAIN_TOML_HEAD = """
[data]
subject = "ct-abdomen-a"

[labels]
liver = 5

[network]
architecture = "attention_unet"
params = { in_channels = 1, num_classes = 2, base_channels = 2, depth = 2 }

[input]
spacing_mm = [6.0, 6.0]
window_center = 50.0
window_width = 400.0

[train]
"""

#: The model card the trained weights go with (one label, liver).
MODEL_TOML = """
name = "tiny-liver"
version = "0"

[weights]
format = "state_dict"
file = "weights.pt"
architecture = "attention_unet"
params = { in_channels = 1, num_classes = 2, base_channels = 2, depth = 2 }

[input]
spacing_mm = [6.0, 6.0]

[[labels]]
value = 1
name = "liver"
category = { code = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
type = { code = "10200004", scheme = "SCT", meaning = "Liver" }
"""


def write_model_dir(directory: Path, train_toml: str, model_toml: str) -> Path:
    """Create ``directory`` holding ``train.toml`` and ``model.toml``; returns it."""
    directory.mkdir()
    (directory / "train.toml").write_text(train_toml)
    (directory / "model.toml").write_text(model_toml)
    return directory
