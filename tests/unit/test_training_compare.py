"""Training smoke tests per architecture and per loss, and the comparison runner."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from scp_node.cli.model import app
from scp_node.errors import ModelError
from scp_node.inference.nets import build_network
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.training.compare import (
    Comparison,
    RowSpec,
    compare,
    flops_per_slice,
    load_results,
    prepare_run,
    summarise,
)
from scp_node.training.data import CropSampler, TrainConfig, load_subject, split_slices
from scp_node.training.train import make_loss, segmentation_loss, train
from tests.support.tiny_liver import MODEL_TOML, TRAIN_TOML_HEAD, write_model_dir

BASE_TRAIN_TOML = (
    TRAIN_TOML_HEAD
    + """crop_size = 32
batch_size = 4
epochs = 2
steps_per_epoch = 6
lr = 1e-2
ce_class_weights = [1.0, 2.0]
foreground_fraction = 1.0
"""
)

BASE_MODEL_TOML = (
    MODEL_TOML
    + """
[metrics]
dice_liver_b_heldout = 0.5
"""
)

UNET = {"num_classes": 2, "base_channels": 4, "depth": 2}
DEEPLAB = {"num_classes": 2, "base_channels": 4, "aspp_channels": 8}


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "base", BASE_TRAIN_TOML, BASE_MODEL_TOML)


def _batch_loss(net: torch.nn.Module, run_dir: Path, shared_data: Path) -> float:
    """The run's loss on one fixed batch of training crops (batch statistics, no update)."""
    config = TrainConfig.from_file(run_dir / "train.toml")
    subject = load_subject(shared_data, config)
    train_slices, _ = split_slices(subject.image.shape[0], config.val_block, config.val_every)
    inputs, target = CropSampler(subject, train_slices, config, np.random.default_rng(99)).sample(8)
    probe = copy.deepcopy(net).train()
    with torch.no_grad():
        return float(make_loss(config)(probe(inputs), target))


@pytest.mark.parametrize(
    ("architecture", "params", "context_slices", "loss", "edge_weight"),
    [
        pytest.param("attention_unet", UNET, 0, "dice+wce", 0.0, id="unet-2d"),
        pytest.param("deeplabv3plus", DEEPLAB, 0, "dice+wce", 0.0, id="deeplab-2d"),
        pytest.param("attention_unet", UNET, 1, "dice+wce", 0.0, id="unet-2.5d-3"),
        pytest.param("attention_unet", UNET, 2, "dice+wce", 0.0, id="unet-2.5d-5"),
        pytest.param("attention_unet", UNET, 0, "dice", 0.0, id="loss-dice"),
        pytest.param("attention_unet", UNET, 0, "dice+wce", 0.3, id="loss-dice+wce+edge"),
    ],
)
def test_training_smoke(
    base_dir: Path,
    tmp_path: Path,
    shared_data: Path,
    architecture: str,
    params: dict[str, int],
    context_slices: int,
    loss: str,
    edge_weight: float,
) -> None:
    row = RowSpec(
        name="smoke",
        architecture=architecture,
        params=params,
        context_slices=context_slices,
        loss=loss,
        edge_weight=edge_weight,
    )
    run_dir = tmp_path / "run"
    prepare_run(base_dir, row, run_dir)
    config = TrainConfig.from_file(run_dir / "train.toml")
    assert (config.loss, config.edge_weight, config.context_slices) == (
        loss,
        edge_weight,
        context_slices,
    )
    torch.manual_seed(5)
    net = build_network(config.architecture, config.params)
    before = _batch_loss(net, run_dir, shared_data)

    result = train(run_dir, shared_data, seed=5, progress=False, network=net)

    assert result.steps == 12
    assert _batch_loss(net, run_dir, shared_data) < before
    spec = ModelSpec.from_model_dir(run_dir)
    assert spec.input.context_slices == context_slices
    predictor = Predictor(device="cpu")
    predictor.load(spec, "fp32")
    out = predictor.predict(np.zeros((6, 40, 44), np.float32), (3.0, 3.0, 3.0))
    assert out.shape == (6, 40, 44)


def test_loss_terms() -> None:
    target = torch.zeros(2, 8, 8, dtype=torch.int64)
    target[:, 2:6, 2:6] = 1
    logits = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([1.0, 3.0])
    plain = segmentation_loss(logits, target, weights, 1.0)
    dice_only = segmentation_loss(logits, target, weights, 1.0, ce=False)
    ce = torch.nn.functional.cross_entropy(logits, target, weight=weights)
    torch.testing.assert_close(plain - dice_only, ce)
    # The soft Dice (MONAI's DiceLoss, batch-pooled, smoothing 1) written out.
    probs = logits.softmax(1)[:, 1]
    onehot = (target == 1).float()
    dice = (2 * (probs * onehot).sum() + 1) / (probs.sum() + onehot.sum() + 1)
    torch.testing.assert_close(dice_only, 1 - dice)
    # Edge term: nothing for uniform probabilities, the mean neighbour difference otherwise.
    flat = torch.zeros(1, 2, 8, 8)
    flat_target = torch.zeros(1, 8, 8, dtype=torch.int64)
    torch.testing.assert_close(
        segmentation_loss(flat, flat_target, None, 1.0, edge_weight=0.5),
        segmentation_loss(flat, flat_target, None, 1.0),
    )
    with_edge = segmentation_loss(logits, target, weights, 1.0, edge_weight=0.2)
    fg = logits.softmax(1)[:, 1:]
    edge = (fg[..., 1:, :] - fg[..., :-1, :]).abs().mean() + (
        fg[..., 1:] - fg[..., :-1]
    ).abs().mean()
    torch.testing.assert_close(with_edge - plain, 0.2 * edge)


def test_bad_loss_in_train_toml(base_dir: Path) -> None:
    (base_dir / "train.toml").write_text(BASE_TRAIN_TOML + 'loss = "focal"\n')
    with pytest.raises(ModelError, match="loss 'focal'"):
        TrainConfig.from_file(base_dir / "train.toml")
    with pytest.raises(ModelError, match="in_channels 1 does not match"):
        prepare_run(
            base_dir,
            RowSpec(
                name="x", architecture="attention_unet", params={"in_channels": 1}, context_slices=1
            ),
            base_dir / "x",
        )


def test_an_organ_row_card_names_its_own_organs_and_colours(base_dir: Path) -> None:
    """A row with its own labels describes, codes and colours them; nothing of the base's
    liver is left in its card (a spleen row is purple in a viewer, as Slicer draws spleens)."""
    card = (base_dir / "model.toml").read_text()
    (base_dir / "model.toml").write_text(
        card.replace(
            "[metrics]",
            "[provenance]\nlabels = \"reference (map 'total', liver = 5)\"\n\n[metrics]",
        )
    )
    row = RowSpec(
        name="spleen-kidney",
        architecture="attention_unet",
        params=UNET | {"num_classes": 3},
        labels={"spleen": 1, "kidney_left": 3},
    )
    run_dir = base_dir / "run"
    prepare_run(base_dir, row, run_dir)
    params = tomllib.loads((run_dir / "model.toml").read_text())["weights"]["params"]
    torch.save(build_network("attention_unet", params).state_dict(), run_dir / "weights.pt")

    spec = ModelSpec.from_model_dir(run_dir)
    assert spec.description.startswith("Spleen, kidney left segmentation: row spleen-kidney")
    assert [(label.value, label.name) for label in spec.labels] == [
        (1, "spleen"),
        (2, "kidney_left"),
    ]
    assert [label.color for label in spec.labels] == [(157, 108, 162), (185, 102, 83)]
    assert spec.labels[1].modifier is not None and spec.labels[1].modifier.code == "7771000"
    assert spec.provenance["labels"] == "reference (map 'total', spleen = 1, kidney_left = 3)"


def test_flops_of_the_shipped_architecture() -> None:
    # models/ct-abdomen/model.toml: 3929 MFLOPs per 167 x 167 slice.
    net = build_network(
        "attention_unet", {"in_channels": 1, "num_classes": 2, "base_channels": 16, "depth": 4}
    )
    assert flops_per_slice(net, 1, 167) / 1e6 == pytest.approx(3929, rel=0.01)


@pytest.mark.slow
def test_compare_saves_resumes_and_tabulates(
    base_dir: Path, tmp_path: Path, shared_data: Path
) -> None:
    comparison_file = tmp_path / "compare.toml"
    comparison_file.write_text(
        f"""
base = "{base_dir}"
seeds = [3]

[[rows]]
name = "unet-2d"
architecture = "attention_unet"
params = {{ num_classes = 2, base_channels = 2, depth = 2 }}
train = {{ epochs = 1, steps_per_epoch = 2 }}

[[rows]]
name = "deeplab-2.5d-dice"
architecture = "deeplabv3plus"
params = {{ num_classes = 2, base_channels = 2, aspp_channels = 4 }}
context_slices = 1
loss = "dice"
train = {{ epochs = 1, steps_per_epoch = 2 }}
"""
    )
    comparison = Comparison.from_file(comparison_file)
    out = tmp_path / "out"
    results = compare(comparison, out, shared_data, rows=["unet-2d"])
    assert [r["row"]["name"] for r in results] == ["unet-2d"]
    record = json.loads((out / "unet-2d" / "seed-3" / "result.json").read_text())
    assert record["seed"] == 3
    assert record["train"]["steps"] == 2
    assert record["heldout_b"]["slices"] == 20
    assert 0.0 <= record["heldout_b"]["dice_liver"] <= 1.0
    assert 0.0 <= record["heldout_a"]["dice_liver"] <= 1.0
    assert record["heldout_a"]["slices"] == 25
    assert record["parameters"] > 0
    assert record["gflops_per_study"] > 0
    assert record["ms_per_200_slice_study"] > 0
    card = ModelSpec.from_model_dir(out / "unet-2d" / "seed-3")
    assert card.variants == {}

    with pytest.raises(ModelError, match="--resume"):
        compare(comparison, out, shared_data, rows=["unet-2d"])
    weights = out / "unet-2d" / "seed-3" / "weights.pt"
    saved_at = weights.stat().st_mtime_ns
    results = compare(comparison, out, shared_data, resume=True)
    assert weights.stat().st_mtime_ns == saved_at  # kept, not retrained
    assert [r["row"]["name"] for r in results] == ["unet-2d", "deeplab-2.5d-dice"]

    header, rows = summarise(load_results(out, comparison))
    assert header[:3] == ["row", "seeds", "B Dice liver"]
    assert [row[0] for row in rows] == ["unet-2d", "deeplab-2.5d-dice"]

    cli = CliRunner().invoke(
        app, ["compare", str(comparison_file), "--out", str(out), "--table-only"]
    )
    assert cli.exit_code == 0, cli.output
    table = (out / "table.md").read_text()
    assert "deeplab-2.5d-dice" in table
    # `model evaluate` given the comparison file prints (and writes) the same table.
    (out / "table.md").unlink()
    cli = CliRunner().invoke(app, ["evaluate", str(comparison_file), "--runs", str(out)])
    assert cli.exit_code == 0, cli.output
    assert (out / "table.md").read_text() == table
    cli = CliRunner().invoke(app, ["evaluate", str(comparison_file), "--runs", str(tmp_path)])
    assert cli.exit_code == 2
    assert "no saved runs" in cli.output

    # --retime times the saved networks again (one row here), keeping everything else.
    before = {r["row"]["name"]: r for r in load_results(out, comparison)}
    cli = CliRunner().invoke(
        app,
        ["compare", str(comparison_file), "--out", str(out), "--retime", "--row", "unet-2d"],
    )
    assert cli.exit_code == 0, cli.output
    after = {r["row"]["name"]: r for r in load_results(out, comparison)}
    retimed = after["unet-2d"]
    assert retimed["timing"]["threads"] == 1 and retimed["timing"]["machine"]["cpu_count"] > 0
    assert retimed["ms_per_200_slice_study"] > 0
    assert retimed["ms_per_200_slice_study"] != before["unet-2d"]["ms_per_200_slice_study"]
    assert retimed["heldout_b"] == before["unet-2d"]["heldout_b"]
    assert after["deeplab-2.5d-dice"] == before["deeplab-2.5d-dice"]  # not asked for
