"""The volume runtime's parts against their references (nnU-Net's functions, torch's
trilinear resize) and a card-described 3-D TorchScript model with a known answer."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scp_node.inference.formats.native import normalise_volume
from scp_node.inference.registry import ModelSpec, NormalisationSpec
from scp_node.inference.runtime import load_runtime
from scp_node.inference.runtime.volume import orientation_flips, resample_argmax
from scp_node.inference.runtime.window import (
    gaussian_weights,
    sliding_window_logits,
    window_starts,
)


@pytest.mark.parametrize(
    ("size", "patch", "step"),
    [(110, 64, 0.5), (64, 64, 0.5), (200, 32, 0.5), (97, 40, 0.33), (128, 128, 1.0), (70, 64, 1.0)],
)
def test_window_starts_are_nnunets(size: int, patch: int, step: float) -> None:
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    (expected,) = compute_steps_for_sliding_window((size,), (patch,), step)
    assert window_starts(size, patch, step) == expected


def test_gaussian_is_nnunets() -> None:
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = (16, 24, 20)
    expected = compute_gaussian(
        patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=torch.device("cpu")
    )
    assert torch.equal(gaussian_weights(patch), expected)


def test_resample_argmax_equals_trilinear_resize_then_argmax() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((5, 7, 9, 11), generator=generator)
    shape = (15, 13, 23)
    expected = F.interpolate(logits[None], size=shape, mode="trilinear", align_corners=False)[0]
    expected_index = expected.argmax(0).numpy()
    got = resample_argmax(logits, shape, slab=4)
    # Ties aside (none with random logits), the same class everywhere.
    assert (got == expected_index).mean() > 0.999
    assert got.dtype == np.uint8 and got.shape == shape
    # Into a view of a bigger map (the crop box of a label map), nothing else written.
    whole = np.full((shape[0] + 2, *shape[1:]), 9, dtype=np.uint16)
    into = resample_argmax(logits, shape, slab=4, out=whole[1:-1])
    assert into.base is not None and np.array_equal(whole[1:-1], got)
    assert (whole[0] == 9).all() and (whole[-1] == 9).all()
    with pytest.raises(ValueError, match="out must be"):
        resample_argmax(logits, shape, out=np.empty(shape, dtype=np.int32))
    same_grid = resample_argmax(logits, logits.shape[1:])
    assert np.array_equal(same_grid, logits.argmax(0).numpy())


def test_sliding_window_of_an_identity_network_gives_the_image_back() -> None:
    image = np.random.default_rng(1).normal(size=(1, 40, 33, 50)).astype(np.float32)
    net = nn.Identity()
    out = sliding_window_logits(image, [net], (16, 16, 16), 1, step=0.5, batch_size=3)
    assert out.dtype == torch.float16 and tuple(out.shape) == (1, 40, 33, 50)
    # Away from the image's faces the blend gives the image back (float16 precision); at
    # the faces the float16 Gaussian's tails underflow, as in nnU-Net's own stitching.
    inner = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert np.allclose(out.float().numpy()[inner], image[inner], atol=2e-2)
    small = sliding_window_logits(image[:, :8, :8, :8], [net], (16, 16, 16), 1)
    assert tuple(small.shape) == (1, 8, 8, 8)


def test_orientation_flips() -> None:
    assert orientation_flips("LPS") == ()
    assert orientation_flips("RAS") == (1, 2)
    with pytest.raises(ValueError, match="orientation"):
        orientation_flips("PIR")


def test_normalisations() -> None:
    volume = np.array([-1000.0, 0.0, 50.0, 250.0, 3000.0], dtype=np.float32)
    window = normalise_volume(volume, NormalisationSpec(kind="window", center=50, width=400))
    assert np.allclose(window, [0.0, 0.375, 0.5, 1.0, 1.0])
    zscore = normalise_volume(
        volume, NormalisationSpec(kind="zscore", clip=(-100, 300), mean=100, std=50)
    )
    assert np.allclose(zscore, [-4.0, -2.0, -1.0, 3.0, 4.0])
    pct = normalise_volume(volume, NormalisationSpec(kind="percentile", low=0, high=100))
    assert pct.min() == 0.0 and pct.max() == 1.0


class _Bright3d(nn.Module):
    """(N, 1, z, y, x) in [0, 1] -> logits (N, 2, ...): class 1 where the input > 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), (x - 0.5) * 20], dim=1)


CARD = """
name = "bright3d"
version = "1"
kind = "volume"

[weights]
format = "torchscript"
file = "bright3d.pt"

[volume]
spacing_mm = [2.0, 2.0, 2.0]
patch_size = [16, 16, 16]
overlap = 0.5
orientation = "{orientation}"
normalisation = {{ kind = "window", center = 50.0, width = 400.0 }}

[[labels]]
value = 9
name = "bright"
category = {{ code = "91723000", scheme = "SCT", meaning = "Anatomical Structure" }}
type = {{ code = "10200004", scheme = "SCT", meaning = "Liver" }}
"""


@pytest.mark.parametrize("orientation", ["LPS", "RAS"])
def test_a_volume_card_runs_with_resampling_both_ways(tmp_path: Path, orientation: str) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.13 but is a model format cards accept.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_Bright3d()), buffer)  # type: ignore[no-untyped-call]
    (tmp_path / "bright3d.pt").write_bytes(buffer.getvalue())
    (tmp_path / "model.toml").write_text(CARD.format(orientation=orientation))
    spec = ModelSpec.from_model_dir(tmp_path)
    assert spec.kind == "volume"
    runtime = load_runtime(spec, "cpu")

    # A bright block (400 HU) in a dark volume (-100 HU), 1 x 0.8 x 0.8 mm voxels.
    volume = np.full((40, 50, 60), -100.0, dtype=np.float32)
    volume[10:30, 12:38, 20:50] = 400.0
    labels = runtime.predict(volume, (1.0, 0.8, 0.8))
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 9}
    expected = volume > 50
    agreement = ((labels == 9) == expected).mean()
    # Only voxels at the block's faces may differ (resampled to 2 mm and back).
    assert agreement > 0.97
    assert (labels[15:25, 18:32, 26:44] == 9).all()
    assert (labels[:5] == 0).all()


@pytest.mark.parametrize(
    ("shape", "new_shape"),
    [((1, 20, 37, 41), (13, 50, 17)), ((2, 9, 30, 30), (9, 12, 64))],
)
def test_separable_resample_equals_nnunets_resampling(
    shape: tuple[int, ...], new_shape: tuple[int, int, int]
) -> None:
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape,
    )

    from scp_node.inference.formats.nnunetv2 import _separable_resample

    data = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = resample_data_or_seg_to_shape(
            data, new_shape, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], is_seg=False, order=3
        )
    got = _separable_resample(data, new_shape, 3)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4
    # Clipped to the input's range, as skimage's resize clips.
    assert got.min() >= data.min() and got.max() <= data.max()


def test_nnunet_preparation_falls_back_to_nnunets_resampling_for_separate_z() -> None:
    """Anisotropic spacing (separate z) and other functions stay nnU-Net's own."""
    from nnunetv2.preprocessing.resampling.default_resampling import (
        resample_data_or_seg_to_shape,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from scp_node.inference.formats.nnunetv2 import _SeparableResampling

    kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    manager = ConfigurationManager(
        {
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": kwargs,
            "architecture": {"network_class_name": "", "arch_kwargs": {}},
        }
    )
    data = np.random.default_rng(3).normal(size=(1, 6, 24, 24)).astype(np.float32)
    resample = _SeparableResampling(manager).resampling_fn_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        thick = resample(data, (15, 20, 20), [5.0, 0.8, 0.8], [2.0, 1.0, 1.0])
        expected = resample_data_or_seg_to_shape(
            data, (15, 20, 20), [5.0, 0.8, 0.8], [2.0, 1.0, 1.0], order=3, force_separate_z=None
        )
    assert np.array_equal(thick, expected)
    iso = resample(data, (8, 30, 30), [1.0, 1.0, 1.0], [0.75, 0.8, 0.8])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_iso = resample_data_or_seg_to_shape(
            data, (8, 30, 30), [1.0, 1.0, 1.0], [0.75, 0.8, 0.8], order=3, force_separate_z=None
        )
    assert np.abs(iso - expected_iso).max() < 1e-4
