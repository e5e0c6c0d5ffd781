"""Model folders for tests: the shipped card under another name, with other rules or
labels, or broken on purpose; weights are links to the shipped files."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "models" / "ct-abdomen"
SHIPPED_CARD = (SHIPPED / "model.toml").read_text()
SHIPPED_SERIES = 'modalities = ["CT"]\nmin_slices = 10\n'


def model_folder(
    models_dir: Path,
    name: str,
    *,
    card: str | None = None,
    replace: dict[str, str] | None = None,
    link_weights: bool = True,
) -> Path:
    """``models_dir/name``: the shipped card renamed (``replace`` applied), its weights and
    its reference case.

    Every ``replace`` key must occur in the card, so a changed shipped card fails loudly
    instead of silently producing the shipped model.
    """
    folder = models_dir / name
    folder.mkdir(parents=True)
    if link_weights:
        for item in SHIPPED.iterdir():
            if item.suffix in (".pt", ".onnx", ".npz"):
                (folder / item.name).symlink_to(item)
    text = card if card is not None else SHIPPED_CARD
    text = text.replace('name = "ct-abdomen"', f'name = "{name}"', 1)
    for old, new in (replace or {}).items():
        assert old in text, f"{old!r} not in the card"
        text = text.replace(old, new)
    (folder / "model.toml").write_text(text)
    return folder


def mr_model(models_dir: Path, name: str = "mr-liver") -> Path:
    """A second model: takes only MR, its own label name and colour."""
    return model_folder(
        models_dir,
        name,
        replace={
            'modalities = ["CT"]': 'modalities = ["MR"]',
            'name = "liver"': 'name = "liver (MR)"',
            "color = [221, 130, 101]": "color = [0, 200, 0]",
            'series_description = "AI abdomen segmentation"': 'series_description = "AI MR liver"',
        },
    )


def thin_ct_model(models_dir: Path, name: str = "ct-thin") -> Path:
    """A second CT model: only series 1 to 3 mm thick whose description says body."""
    return model_folder(
        models_dir,
        name,
        replace={
            SHIPPED_SERIES: SHIPPED_SERIES
            + 'slice_thickness_mm = [1.0, 3.0]\nseries_description = "body"\n',
            'series_description = "AI abdomen segmentation"': 'series_description = "AI thin"',
        },
    )
