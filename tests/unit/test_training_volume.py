"""Smoke tests of the comparison's 3-D rows (nnU-Net folder, hybrid), multi-organ rows and
the shipping rule."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scp_node.errors import ModelError
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.inference.runtime import load_runtime
from scp_node.inference.runtime.volume import VolumePredictor
from scp_node.training.compare import (
    Comparison,
    RowSpec,
    _same_row,
    compare,
    prepare_run,
    ship_rule,
    time_volume_study,
    volume_gflops_per_study,
    volume_recipe,
)
from scp_node.training.data import TrainConfig, split_slices
from scp_node.training.train import train
from scp_node.training.volume import (
    VolumeRecipe,
    _augmentation,
    _loss,
    _PatchSampler,
    build_volume_network,
    prepare_volume_data,
    thin_slab,
    train_volume,
    write_volume_model,
)
from tests.support.tiny_liver import write_model_dir

from .test_training_compare import BASE_MODEL_TOML, BASE_TRAIN_TOML

ORGANS = {"liver": 5, "spleen": 1, "stomach": 6}
TINY = {
    "nnunet3d": {"features": [4, 8, 16]},
    "hybrid": {"base_channels": 2, "depth": 2, "features": 4, "head_channels": 4},
}


def _recipe(kind: str, **changes: Any) -> VolumeRecipe:
    settings: dict[str, Any] = {
        "kind": kind,
        "labels": ORGANS,
        "params": TINY[kind],
        "patch": (8, 32, 32),
        "batch_size": 2,
        "steps": 6,
        "lr": 1e-2,
        "foreground_fraction": 1.0,
        "augment": False,
    }
    settings.update(changes)
    return VolumeRecipe(**settings)


def _fixed_loss(network: torch.nn.Module, recipe: VolumeRecipe, data: Any) -> float:
    """The loss on one fixed batch of patches (no update, training-mode normalisation)."""
    from monai.losses.dice import MaskedDiceLoss

    sampler = _PatchSampler(data, recipe, np.random.default_rng(99))
    patches = [sampler.patch() for _ in range(4)]
    inputs = torch.stack([p[0] for p in patches])
    target = torch.stack([p[1] for p in patches])
    dice = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    with torch.no_grad():
        return float(_loss(copy.deepcopy(network).train()(inputs), target, recipe, dice))


@pytest.mark.parametrize("kind", ["nnunet3d", "hybrid"])
def test_volume_row_smoke(tmp_path: Path, shared_data: Path, kind: str) -> None:
    recipe = _recipe(kind)
    data = prepare_volume_data(recipe, shared_data)
    # A's held-out blocks keep their image but lose their labels.
    heldout = split_slices(data.target.shape[0], 5, 5)[1]
    assert (data.target[heldout] == -1).all()
    assert (data.target[[z for z in range(data.target.shape[0]) if z not in heldout]] >= 0).all()
    assert set(np.unique(data.target)) == {-1, 0, 1, 2, 3}
    torch.manual_seed(0)
    network = build_volume_network(recipe, data.extra)
    before = _fixed_loss(network, recipe, data)

    result = train_volume(network, data, recipe, seed=0)

    assert result.steps == 6
    assert _fixed_loss(network, recipe, data) < before
    write_volume_model(tmp_path, network, recipe, data.extra, f"smoke-{kind}")
    spec = ModelSpec.from_model_dir(tmp_path)
    assert spec.kind == "volume"
    assert [(label.value, label.name) for label in spec.labels] == [
        (1, "liver"),
        (2, "spleen"),
        (3, "stomach"),
    ]
    assert spec.labels[0].type.meaning == "Liver"
    runtime = load_runtime(spec, "cpu")
    assert isinstance(runtime, VolumePredictor)
    out = runtime.predict(np.zeros((10, 40, 44), np.int16), (3.0, 3.0, 3.0))
    assert out.shape == (10, 40, 44)
    assert set(np.unique(out)) <= {0, 1, 2, 3}
    assert volume_gflops_per_study(spec) > 0
    assert time_volume_study(spec, (12, 48, 48), (2.0, 2.0, 2.0)) > 0


def test_augmentation_is_seeded_and_keeps_labels(shared_data: Path) -> None:
    recipe = _recipe("hybrid", augment=True)
    data = prepare_volume_data(recipe, shared_data)
    image, target = _PatchSampler(data, recipe, np.random.default_rng(1)).patch()
    runs = []
    for _ in range(2):
        augment = _augmentation(recipe, seed=7)
        runs.append(
            [
                augment({"image": image.clone(), "label": (target + 1)[None].float()})
                for _ in range(3)
            ]
        )
    for first, second in zip(*runs, strict=True):
        torch.testing.assert_close(
            torch.as_tensor(first["image"]), torch.as_tensor(second["image"])
        )
        labels = torch.as_tensor(first["label"]).round().long() - 1
        assert set(labels.unique().tolist()) <= {-1, 0, 1, 2, 3}
    assert not torch.equal(torch.as_tensor(runs[0][0]["image"]), image)


def test_a_thin_slab_patch_looks_like_a_thin_study_padded_for_the_window() -> None:
    """Each slab is a contiguous run of the patch's own slices, centred between zeros as the
    runtime pads a study thinner than its window; outside the run nothing is learnt."""
    depth = 16
    image = (
        torch.arange(1, depth + 1, dtype=torch.float32).reshape(1, depth, 1, 1).repeat(1, 1, 3, 3)
    )
    target = torch.arange(depth).reshape(depth, 1, 1).repeat(1, 3, 3) % 4
    rng = np.random.default_rng(3)
    counts = set()
    for _ in range(40):
        slab, labels = thin_slab(image, target, rng)
        assert slab.shape == image.shape and labels.shape == target.shape
        kept = torch.nonzero(slab[0, :, 0, 0]).flatten().tolist()
        count = len(kept)
        counts.add(count)
        assert 6 <= count < depth
        assert kept == list(range((depth - count) // 2, (depth - count) // 2 + count))
        values = slab[0, kept, 0, 0]
        assert torch.equal(values, torch.arange(values[0], values[0] + count))  # contiguous
        assert torch.equal(labels[kept], target[(values - 1).long()])
        outside = [z for z in range(depth) if z not in kept]
        assert (slab[:, outside] == 0).all() and (labels[outside] == -1).all()
    assert len(counts) > 3  # the thickness varies


def test_nnunet_normalisation_can_span_every_structure(shared_data: Path) -> None:
    """The liver alone of non-contrast subject A gives a clip window of about -23..80 HU; all
    its structures (bone, lung, fat among them) a window that keeps a contrast-enhanced liver
    (about 90 HU) unclipped."""
    ranges = {}
    for foreground in ("labels", "all"):
        recipe = _recipe("nnunet3d", labels={"liver": 5}, norm_foreground=foreground)
        plans = prepare_volume_data(recipe, shared_data).extra["plans"]
        props = plans["foreground_intensity_properties_per_channel"]["0"]
        ranges[foreground] = (props["percentile_00_5"], props["percentile_99_5"])
    assert ranges["labels"][1] < 90 < ranges["all"][1]
    assert ranges["all"][0] < -500 < ranges["labels"][0]


def test_volume_row_trains_on_thin_slabs(shared_data: Path) -> None:
    recipe = _recipe("hybrid", slab_fraction=1.0, patch=(12, 32, 32))
    data = prepare_volume_data(recipe, shared_data)
    torch.manual_seed(0)
    network = build_volume_network(recipe, data.extra)
    before = _fixed_loss(network, recipe, data)
    assert train_volume(network, data, recipe, seed=0).steps == 6
    assert _fixed_loss(network, recipe, data) < before


def test_volume_recipe_checks(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="kind 'unet4d'"):
        VolumeRecipe(kind="unet4d", labels=ORGANS)
    with pytest.raises(ModelError, match=r"slab_fraction 1\.5"):
        VolumeRecipe(kind="hybrid", labels=ORGANS, slab_fraction=1.5)
    with pytest.raises(ModelError, match="norm_foreground 'body'"):
        VolumeRecipe(kind="nnunet3d", labels=ORGANS, norm_foreground="body")
    with pytest.raises(ModelError, match="needs labels"):
        VolumeRecipe(kind="hybrid", labels={})
    with pytest.raises(ModelError, match="slice rows only"):
        RowSpec(name="x", kind="hybrid", context_slices=1)
    with pytest.raises(ModelError, match="needs an architecture"):
        RowSpec(name="x")
    # Results saved before rows had ``kind`` and ``labels`` still belong to their row.
    row = RowSpec(name="old", architecture="attention_unet", params={"depth": 2})
    saved = {k: v for k, v in asdict(row).items() if k not in ("kind", "labels")}
    assert _same_row(saved, row)
    assert not _same_row({**saved, "labels": {"liver": 5}}, row)
    recipe = _recipe("nnunet3d", params={"features": [4, 8, 16, 32]}, patch=(12, 32, 32))
    data_free = {"plans": None}
    with pytest.raises(ModelError, match="not a multiple of 8"):
        from scp_node.training.volume import _nnunet_plans

        _nnunet_plans(recipe, np.zeros(10, np.float32))
    del data_free


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "base", BASE_TRAIN_TOML, BASE_MODEL_TOML)


def test_multi_organ_slice_row(base_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    row = RowSpec(
        name="organs",
        architecture="attention_unet",
        params={"base_channels": 2, "depth": 2},
        labels=ORGANS,
        train={"monai_augment": True},
    )
    run_dir = tmp_path / "run"
    prepare_run(base_dir, row, run_dir)
    config = TrainConfig.from_file(run_dir / "train.toml")
    assert config.labels == ORGANS
    assert config.num_classes == 4 == config.params["num_classes"]
    assert config.ce_class_weights == (1.0, 2.0, 2.0, 2.0)
    assert config.monai_augment

    result = train(run_dir, shared_data, seed=1, progress=False)

    assert result.steps == 12
    spec = ModelSpec.from_model_dir(run_dir)
    assert [label.name for label in spec.labels] == ["liver", "spleen", "stomach"]
    assert spec.labels[1].type.meaning == "Spleen"
    predictor = Predictor(device="cpu")
    predictor.load(spec, "fp32")
    assert predictor.predict(np.zeros((4, 40, 44), np.float32), (3.0, 3.0, 3.0)).shape == (
        4,
        40,
        44,
    )
    with pytest.raises(ModelError, match="num_classes 2 does not match 3 labels"):
        prepare_run(
            base_dir,
            RowSpec(
                name="x", architecture="attention_unet", params={"num_classes": 2}, labels=ORGANS
            ),
            tmp_path / "x",
        )


def _record(
    row: str, seed: int, dice: dict[str, float], voxels: dict[str, float]
) -> dict[str, Any]:
    heldout_b: dict[str, float] = {}
    for label, value in dice.items():
        heldout_b[f"dice_{label}"] = value
        heldout_b[f"reference_voxels_{label}"] = voxels[label]
    return {"row": {"name": row}, "seed": seed, "heldout_b": heldout_b}


def test_ship_rule(tmp_path: Path, base_dir: Path) -> None:
    comparison_file = tmp_path / "c.toml"
    comparison_file.write_text(
        f'base = "{base_dir}"\nseeds = [0, 1, 2]\n[[rows]]\nname = "a"\narchitecture = "x"\n'
    )
    comparison = Comparison.from_file(comparison_file)
    assert (comparison.ship_min_dice, comparison.ship_min_seeds) == (0.85, 3)
    voxels = {"liver": 1000.0, "spleen": 500.0, "kidney_left": 0.0, "stomach": 300.0}
    results = [
        _record(
            "multi",
            seed,
            {"liver": 0.95, "spleen": 0.9 - 0.1 * (seed == 2), "kidney_left": 1.0, "stomach": 0.88},
            voxels,
        )
        for seed in range(3)
    ] + [_record("two-seeds", seed, {"liver": 0.97}, voxels) for seed in range(2)]
    verdicts = {(v.row, v.label): v for v in ship_rule(results, comparison)}
    assert verdicts["multi", "liver"].qualifies
    assert verdicts["multi", "stomach"].qualifies
    assert not verdicts["multi", "spleen"].qualifies
    assert verdicts["multi", "spleen"].min_dice == pytest.approx(0.8)
    assert not verdicts["multi", "kidney_left"].qualifies
    assert "absent" in verdicts["multi", "kidney_left"].why
    assert not verdicts["two-seeds", "liver"].qualifies
    assert "2 < 3 seeds" in verdicts["two-seeds", "liver"].why


@pytest.mark.slow
def test_compare_runs_a_volume_row(base_dir: Path, tmp_path: Path, shared_data: Path) -> None:
    comparison_file = tmp_path / "compare.toml"
    comparison_file.write_text(
        f"""
base = "{base_dir}"
seeds = [4]
time_studies = false

[[rows]]
name = "hybrid"
kind = "hybrid"
labels = {{ liver = 5, spleen = 1 }}
params = {{ base_channels = 2, depth = 2, features = 4, head_channels = 4 }}
train = {{ steps = 2, patch = [32, 64, 64] }}
"""
    )
    comparison = Comparison.from_file(comparison_file)
    recipe = volume_recipe(comparison, comparison.rows[0])
    assert recipe.patch == (32, 64, 64)
    results = compare(comparison, tmp_path / "out", shared_data)
    record = json.loads((tmp_path / "out" / "hybrid" / "seed-4" / "result.json").read_text())
    assert results[0]["seed"] == record["seed"] == 4
    assert record["train"]["steps"] == 2
    assert record["heldout_b"]["slices"] == 20
    assert record["heldout_b"]["reference_voxels_liver"] > 0
    assert record["heldout_a"]["slices"] == 25
    assert 0.0 <= record["heldout_a"]["dice_spleen"] <= 1.0
    assert record["gflops_per_study"] > 0
    assert record["parameters"] > 0
