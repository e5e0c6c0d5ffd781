"""Training data preparation and a tiny deterministic training run on subject A."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from scp_node.errors import ModelError
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.training.data import (
    CropSampler,
    TrainConfig,
    elastic_displacement,
    load_nifti_zyx,
    load_subject,
    split_slices,
)
from scp_node.training.train import dice_scores, segmentation_loss, train
from scp_node.training.variants import prune_model, quantize_model
from tests.support.tiny_liver import MODEL_TOML, TRAIN_TOML_HEAD, write_model_dir

TINY_TRAIN_TOML = (
    TRAIN_TOML_HEAD
    + """crop_size = 24
batch_size = 4
epochs = 1
steps_per_epoch = 3
lr = 1e-2
ce_class_weights = [1.0, 2.0]
"""
)

TINY_MODEL_TOML = MODEL_TOML


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "tiny", TINY_TRAIN_TOML, TINY_MODEL_TOML)


def test_nifti_is_reoriented_to_dicom_pixel_order(shared_data: Path) -> None:
    labels, spacing = load_nifti_zyx(shared_data / "ct-abdomen-a" / "labels.nii.gz")
    assert labels.shape == (112, 101, 122)
    assert spacing == (3.0, 3.0, 3.0)
    z, _, x = np.nonzero(labels == 5)
    # Columns run towards patient Left, so the liver (patient right) has small column indices.
    assert x.mean() < labels.shape[2] / 2
    # The lungs (labels 10-14) lie above the liver: higher z is Superior.
    lung_z = np.nonzero(np.isin(labels, [10, 11, 12, 13, 14]))[0]
    assert lung_z.mean() > z.mean()


def test_split_slices_by_blocks() -> None:
    train_idx, val_idx = split_slices(23, block=5, every=2)
    assert val_idx == [*range(0, 5), *range(10, 15), *range(20, 23)]
    assert sorted(train_idx + val_idx) == list(range(23))


def test_sampler_is_seeded(tiny_model_dir: Path, shared_data: Path) -> None:
    config = TrainConfig.from_file(tiny_model_dir / "train.toml")
    subject = load_subject(shared_data, config)
    assert subject.image.shape == (112, 50, 61)
    batches = [
        CropSampler(subject, range(60, 100), config, np.random.default_rng(3)).sample(5)
        for _ in range(2)
    ]
    torch.testing.assert_close(batches[0][0], batches[1][0])
    torch.testing.assert_close(batches[0][1], batches[1][1])
    inputs, target = batches[0]
    assert inputs.shape == (5, 1, 24, 24)
    assert target.shape == (5, 24, 24)
    assert target.dtype == torch.int64
    assert float(inputs.min()) >= 0.0
    assert float(inputs.max()) <= 1.0


def test_loss_and_dice() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    target[0, 2:6, 2:6] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20 - 10
    wrong = -perfect
    assert segmentation_loss(perfect, target, None, 1.0) < segmentation_loss(
        wrong, target, None, 1.0
    )
    assert dice_scores(target.numpy(), target.numpy(), 2) == [1.0]
    assert dice_scores(np.zeros((4, 4), int), np.zeros((4, 4), int), 2) == [1.0]


def test_missing_or_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no train\.toml"):
        TrainConfig.from_file(tmp_path / "train.toml")
    (tmp_path / "train.toml").write_text("[data]\nsubject = 'x'\n")
    with pytest.raises(ModelError, match="missing key"):
        TrainConfig.from_file(tmp_path / "train.toml")


def test_tiny_training_is_deterministic_and_loadable(
    tiny_model_dir: Path, tmp_path: Path, shared_data: Path
) -> None:
    first = train(tiny_model_dir, shared_data, seed=7, progress=False)
    weights_first = torch.load(first.weights_path, weights_only=True)
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    (again_dir / "train.toml").write_text(TINY_TRAIN_TOML)
    second = train(again_dir, shared_data, seed=7, progress=False)
    weights_second = torch.load(second.weights_path, weights_only=True)
    assert weights_first.keys() == weights_second.keys()
    for key, value in weights_first.items():
        torch.testing.assert_close(value, weights_second[key], rtol=0, atol=0, msg=key)
    assert first.val_dice == second.val_dice
    assert first.steps == 3
    assert first.epochs_run == 1
    assert 0.0 <= first.val_dice <= 1.0

    predictor = Predictor(device="cpu")
    predictor.load(ModelSpec.from_model_dir(tiny_model_dir))
    out = predictor.predict(np.zeros((2, 30, 40), np.float32), (3.0, 3.0, 3.0))
    assert out.shape == (2, 30, 40)
    assert out.dtype == np.uint8


def test_elastic_displacement_is_smooth_and_seeded() -> None:
    first = elastic_displacement(np.random.default_rng(3), 2, 32, 2.0)
    again = elastic_displacement(np.random.default_rng(3), 2, 32, 2.0)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (2, 2, 32, 32)
    assert 0.5 < float(first.std()) < 4.0
    # Smooth: neighbouring pixels move almost together.
    assert float(np.abs(np.diff(first, axis=-1)).mean()) < 0.2 * float(first.std())


def test_sampler_with_elastic_keeps_labels_on_the_image(
    tiny_model_dir: Path, shared_data: Path
) -> None:
    config = replace(
        TrainConfig.from_file(tiny_model_dir / "train.toml"),
        elastic_px=2.0,
        foreground_fraction=1.0,
    )
    subject = load_subject(shared_data, config)
    slices = range(subject.image.shape[0])
    sampler = CropSampler(subject, slices, config, np.random.default_rng(0))
    inputs, target = sampler.sample(8)
    assert inputs.shape == (8, 1, 24, 24)
    assert set(torch.unique(target).tolist()) <= {0, 1}
    # Liver voxels stay soft tissue after the warp (windowed 50/400 -> around 0.6).
    assert 0.45 < float(inputs[:, 0][target == 1].mean()) < 0.8


def test_prune_fine_tune_and_quantize_pipeline(tiny_model_dir: Path, shared_data: Path) -> None:
    train(tiny_model_dir, shared_data, seed=1, progress=False)
    result = prune_model(tiny_model_dir, shared_data, ratio=0.5, epochs=1, progress=False)
    assert result.widths_after == (1, 2, 4)
    assert result.flops_after < result.flops_before
    assert result.fine_tune is not None and result.fine_tune.steps == 3
    written = quantize_model(
        tiny_model_dir, shared_data, source="pruned", methods=("ort",), calibration_slices=4
    )
    assert set(written) == {"pruned-onnx", "pruned-int8-ort"}
    spec = ModelSpec.from_model_dir(tiny_model_dir)
    assert spec.variants["pruned"].params["widths"] == [1, 2, 4]
    assert spec.variants["pruned-int8-ort"].pad_multiple == 4
    volume = np.random.default_rng(0).normal(40, 80, (3, 50, 60)).astype(np.float32)
    outputs = {}
    for variant in ("pruned", "pruned-onnx", "pruned-int8-ort"):
        predictor = Predictor("cpu")
        predictor.load(spec, variant)
        outputs[variant] = predictor.predict(volume, (3.0, 3.0, 3.0))
    np.testing.assert_array_equal(outputs["pruned"], outputs["pruned-onnx"])
    assert outputs["pruned-int8-ort"].shape == volume.shape
