"""3-D rows of the comparison: a 3-D U-Net as an nnU-Net v2 folder, and the 2-D + 3-D hybrid.

Both are trained on subject A by one loop (:func:`train_volume`): random patches, half of
them centred on a voxel of a randomly chosen organ (small organs get seen), MONAI's
transforms for strong augmentation (affine, elastic, intensity, noise, simulated low
resolution), cross-entropy + MONAI's masked soft Dice. The held-out blocks of subject A
(the 2-D rows' validation slices, :func:`~scp_node.training.data.split_slices`) keep their
image as context but their labels are never used: their voxels are masked out of the loss.
No checkpoint is chosen on them either (the last weights are kept, after a cosine schedule),
so subject A's held-out figures of 3-D rows are an independent measure.

Each kind is written in a format the node's volume runtime loads, and the training input
is made the way that format's preprocessing makes it at inference:

``nnunet3d``
    nnU-Net's ``PlainConvUNet`` (the TotalSegmentator-fast topology of
    ``bench/real3d.py``, widths as the row says) as an nnU-Net v2 trained-model folder with
    its own plans (3 mm, CT normalisation from subject A's organ voxels); subject A goes
    through nnU-Net's ``DefaultPreprocessor`` in RAS, as the node's nnU-Net format does.
``hybrid``
    :class:`~scp_node.inference.nets.HybridUNet` exported to TorchScript in a
    ``kind = "volume"`` card of the node's own format (window 50/400, 3 mm, LPS).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from scp_node.errors import ModelError
from scp_node.training.data import LOSSES, load_nifti_zyx, split_slices
from scp_node.training.variants import toml_value

__all__ = [
    "VOLUME_KINDS",
    "VolumeData",
    "VolumeRecipe",
    "VolumeTrainResult",
    "build_volume_network",
    "coded_labels",
    "prepare_volume_data",
    "thin_slab",
    "train_volume",
    "train_volume_row",
    "write_volume_model",
]

logger = logging.getLogger(__name__)

#: Row kinds trained here (``kind`` in a comparison row).
VOLUME_KINDS = ("nnunet3d", "hybrid")
NNUNET_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
HYBRID_WEIGHTS = "network.pt"
#: Fraction of the held-out blocks: the 2-D recipe's ``val_block`` and ``val_every``.
_VAL_BLOCK, _VAL_EVERY = 5, 5


@dataclass(frozen=True)
class VolumeRecipe:
    """How a 3-D row is trained.

    ``labels`` maps each output class (in order, class 1 first) to its value in subject
    A's ``total`` label map. ``params``: for ``nnunet3d`` ``features`` (per stage, the
    stage count follows), for ``hybrid`` :class:`HybridUNet`'s keyword arguments.
    ``patch`` (z, y, x) is both the training crop and the inference window.
    """

    kind: str
    labels: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)
    subject: str = "ct-abdomen-a"
    patch: tuple[int, int, int] = (48, 96, 96)
    spacing_mm: float = 3.0
    batch_size: int = 2
    steps: int = 3000
    lr: float = 3e-3
    weight_decay: float = 1e-4
    foreground_fraction: float = 0.6
    augment: bool = True
    #: ``"dice+wce"``: cross-entropy (weighted by ``ce_class_weights`` when given) + soft
    #: Dice; ``"dice"``: soft Dice alone (the 2-D rows' loss names).
    loss: str = "dice+wce"
    ce_class_weights: tuple[float, ...] = ()
    #: Share of patches cut down to a thin slab of slices, centred between zeros as the
    #: volume runtime pads a study thinner than the window (a 20-slice series of 2 mm is 13
    #: slices at 3 mm): a 3-D network that never saw such padding fails on thin studies.
    slab_fraction: float = 0.0
    #: Which voxels of subject A give nnU-Net's CT normalisation its clip range, mean and SD
    #: (``nnunet3d`` rows): ``"labels"`` the row's own organs; ``"all"`` every structure of
    #: the subject's label map, as nnU-Net takes every class of its dataset. A liver-only
    #: row of a non-contrast subject clips at -23..80 HU, which saturates a contrast-enhanced
    #: liver (about 90 HU).
    norm_foreground: str = "labels"

    def __post_init__(self) -> None:
        if self.kind not in VOLUME_KINDS:
            raise ModelError(f"volume kind {self.kind!r} is not one of {VOLUME_KINDS}")
        if not self.labels:
            raise ModelError("a volume row needs labels")
        if self.loss not in LOSSES:
            raise ModelError(f"volume loss {self.loss!r} is not one of {LOSSES}")
        if self.ce_class_weights and len(self.ce_class_weights) != self.num_classes:
            raise ModelError(
                f"ce_class_weights {self.ce_class_weights} needs {self.num_classes} values"
            )
        if len(self.patch) != 3 or min(self.patch) < 8:
            raise ModelError(f"patch {self.patch} must be three sizes >= 8")
        if self.norm_foreground not in ("labels", "all"):
            raise ModelError(f"norm_foreground {self.norm_foreground!r} is not labels or all")
        if not 0.0 <= self.slab_fraction <= 1.0:
            raise ModelError(f"slab_fraction {self.slab_fraction} must be within [0, 1]")

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return len(self.labels) + 1


@dataclass(frozen=True)
class VolumeData:
    """Subject A as the row's format prepares it.

    ``image`` (channels, z, y, x) float32; ``target`` (z, y, x) int64 class indices with
    -1 where the label is not to be learnt (A's held-out blocks).
    """

    image: npt.NDArray[np.float32]
    target: npt.NDArray[np.int64]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VolumeTrainResult:
    """What a 3-D training run produced."""

    steps: int
    minutes: float
    stopped: str
    last_loss: float
    parameters: int


def _nnunet_plans(recipe: VolumeRecipe, foreground: npt.NDArray[np.float32]) -> dict[str, Any]:
    """A 3d_fullres nnU-Net v2 plan: PlainConvUNet at 3 mm, CT normalisation from the
    ``foreground`` voxels' intensities (see ``VolumeRecipe.norm_foreground``)."""
    features = [int(f) for f in recipe.params.get("features", [8, 16, 32, 64, 80, 80])]
    stages = len(features)
    if stages < 3:
        raise ModelError(f"nnunet3d: features {features} needs at least three stages")
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1)
    for axis, size in enumerate(recipe.patch):
        if size % 2 ** (stages - 1):
            raise ModelError(
                f"nnunet3d: patch {recipe.patch} axis {axis} is not a multiple of "
                f"{2 ** (stages - 1)} ({stages} stages)"
            )
    spacing = [recipe.spacing_mm] * 3
    return {
        "dataset_name": "Dataset900_SubjectA",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [int(s) for s in recipe.patch],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "scp_node.training.volume",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": float(foreground.max()),
                "mean": float(foreground.mean()),
                "median": float(np.median(foreground)),
                "min": float(foreground.min()),
                "percentile_00_5": float(np.percentile(foreground, 0.5)),
                "percentile_99_5": float(np.percentile(foreground, 99.5)),
                "std": float(foreground.std()),
            }
        },
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": recipe.batch_size,
                "patch_size": list(recipe.patch),
                "median_image_size_in_voxels": [float(s) for s in recipe.patch],
                "spacing": spacing,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {
                    "is_seg": False,
                    "order": 3,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_seg_kwargs": {
                    "is_seg": True,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": (
                        "dynamic_network_architectures.architectures.unet.PlainConvUNet"
                    ),
                    "arch_kwargs": {
                        "n_stages": stages,
                        "features_per_stage": features,
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * stages,
                        "strides": strides,
                        "n_conv_per_stage": [2] * stages,
                        "n_conv_per_stage_decoder": [2] * (stages - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": False,
            }
        },
    }


def _dataset_json(recipe: VolumeRecipe) -> dict[str, Any]:
    return {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: i for i, name in enumerate(recipe.labels, 1)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }


def _heldout_z(depth: int) -> list[int]:
    return split_slices(depth, _VAL_BLOCK, _VAL_EVERY)[1]


def _classes(source: npt.NDArray[Any], recipe: VolumeRecipe) -> npt.NDArray[np.int64]:
    target = np.zeros(source.shape, dtype=np.int64)
    for index, value in enumerate(recipe.labels.values(), start=1):
        target[source == value] = index
    return target


def prepare_volume_data(recipe: VolumeRecipe, data_dir: Path) -> VolumeData:
    """Subject A prepared as the row's format prepares a study at inference.

    For ``nnunet3d`` ``extra`` holds the ``plans`` and ``dataset`` written with the folder.

    Raises
    ------
    ModelError
        nnU-Net's preprocessing cropped subject A (its held-out blocks would no longer line
        up), or a file is missing.
    """
    folder = data_dir / recipe.subject
    if recipe.kind == "nnunet3d":
        import nibabel as nib
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import (
            DefaultPreprocessor,
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        # nibabel's loaders are typed loosely.
        nibabel: Any = nib
        ct: Any = nibabel.as_closest_canonical(nibabel.load(folder / "ct.nii.gz"))
        total: Any = nibabel.as_closest_canonical(nibabel.load(folder / "labels.nii.gz"))
        # (z, y, x) with x -> Right, y -> Anterior, z -> Superior: the card's "RAS".
        image = np.asarray(ct.dataobj, dtype=np.float32).transpose(2, 1, 0)
        structures = np.asarray(total.dataobj).transpose(2, 1, 0)
        target = _classes(structures, recipe)
        foreground = structures > 0 if recipe.norm_foreground == "all" else target > 0
        plans = _nnunet_plans(recipe, image[foreground])
        dataset = _dataset_json(recipe)
        manager = PlansManager(plans)
        spacing = [float(s) for s in ct.header.get_zooms()[:3]][::-1]
        data, seg, _props = DefaultPreprocessor(verbose=False).run_case_npy(
            image[None],
            target[None].astype(np.int16),
            {"spacing": spacing},
            manager,
            manager.get_configuration("3d_fullres"),
            dataset,
        )
        if data.shape[1:] != image.shape:
            raise ModelError(
                f"nnU-Net preprocessing changed subject A's grid {image.shape} -> "
                f"{data.shape[1:]}: the held-out blocks would not line up"
            )
        prepared = np.ascontiguousarray(data, dtype=np.float32)
        target = np.ascontiguousarray(seg[0]).astype(np.int64).clip(min=0)
        extra: dict[str, Any] = {"plans": plans, "dataset": dataset}
    else:
        from scp_node.inference.formats.native import normalise_volume
        from scp_node.inference.registry import NormalisationSpec

        raw, spacing_zyx = load_nifti_zyx(folder / "ct.nii.gz")
        labels, _ = load_nifti_zyx(folder / "labels.nii.gz")
        if any(abs(s - recipe.spacing_mm) > 1e-3 for s in spacing_zyx):
            raise ModelError(
                f"hybrid rows train at the subject's own spacing; {recipe.subject} is "
                f"{spacing_zyx} mm, the row asks {recipe.spacing_mm} mm"
            )
        prepared = normalise_volume(raw.astype(np.float32), NormalisationSpec())[None]
        target = _classes(labels, recipe)
        extra = {}
    target[_heldout_z(target.shape[0])] = -1
    return VolumeData(image=prepared, target=target, extra=extra)


def build_volume_network(recipe: VolumeRecipe, extra: Mapping[str, Any]) -> nn.Module:
    """A fresh network for the row (nnU-Net's from the plans, or the hybrid)."""
    if recipe.kind == "nnunet3d":
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        architecture = extra["plans"]["configurations"]["3d_fullres"]["architecture"]
        network: nn.Module = get_network_from_plans(
            architecture["network_class_name"],
            architecture["arch_kwargs"],
            architecture["_kw_requires_import"],
            1,
            recipe.num_classes,
            deep_supervision=False,
        )
        return network
    from scp_node.inference.nets import build_network

    return build_network(
        "hybrid_unet", {"in_channels": 1, "num_classes": recipe.num_classes, **recipe.params}
    )


def _augmentation(recipe: VolumeRecipe, seed: int) -> Any:
    """MONAI's strong augmentation of one (image, label) patch, seeded.

    Labels are shifted by one before (0 then means "outside the volume" after padding and
    is ignored like the held-out blocks) and back after.
    """
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.dictionary import (
        RandAdjustContrastd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )
    from monai.transforms.spatial.dictionary import (
        Rand3DElasticd,
        RandAffined,
        RandSimulateLowResolutiond,
    )

    keys = ("image", "label")
    transforms = Compose(
        [
            # Rotation mostly in the axial plane (about z, array axis 0); no flips, which
            # would swap the body's sides.
            RandAffined(
                keys,
                prob=0.7,
                rotate_range=(math.radians(15), math.radians(5), math.radians(5)),
                scale_range=(0.15, 0.15, 0.15),
                translate_range=(2, 4, 4),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            Rand3DElasticd(
                keys,
                sigma_range=(5, 8),
                magnitude_range=(40, 120),
                prob=0.2,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandSimulateLowResolutiond(("image",), prob=0.25, zoom_range=(0.5, 1.0)),
            RandScaleIntensityd(("image",), factors=0.1, prob=0.5),
            RandShiftIntensityd(("image",), offsets=0.1, prob=0.5),
            RandAdjustContrastd(("image",), prob=0.3, gamma=(0.8, 1.25)),
            RandGaussianNoised(("image",), prob=0.3, std=0.03),
        ]
    )
    transforms.set_random_state(seed=seed)
    return transforms


def _pad_to(data: torch.Tensor, patch: tuple[int, int, int], value: float) -> torch.Tensor:
    pad = [max(0, p - s) for p, s in zip(patch, data.shape[-3:], strict=True)]
    if not any(pad):
        return data
    flat = [v for p in reversed(pad) for v in (0, p)]
    return F.pad(data, flat, value=value)


class _PatchSampler:
    """Random patches, a share centred on a voxel of a randomly chosen (trainable) class."""

    def __init__(self, data: VolumeData, recipe: VolumeRecipe, rng: np.random.Generator):
        self.recipe = recipe
        self.rng = rng
        self.image = _pad_to(torch.from_numpy(data.image), recipe.patch, float(data.image.min()))
        self.target = _pad_to(torch.from_numpy(data.target), recipe.patch, -1)
        target = self.target.numpy()
        self.by_class = [np.argwhere(target == c) for c in range(1, recipe.num_classes)]
        self.by_class = [points for points in self.by_class if len(points)]

    def patch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng, patch = self.rng, self.recipe.patch
        shape = self.target.shape
        if self.by_class and rng.random() < self.recipe.foreground_fraction:
            points = self.by_class[int(rng.integers(len(self.by_class)))]
            centre = points[int(rng.integers(len(points)))]
            corner = [
                int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                for c, p, s in zip(centre, patch, shape, strict=True)
            ]
        else:
            corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch, strict=True)]
        window = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        return self.image[(slice(None), *window)], self.target[window]


#: Fewest slices a thin-slab patch keeps (18 mm at 3 mm).
_SLAB_MIN_SLICES = 6


def thin_slab(
    image: torch.Tensor, target: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random run of slices of a (channels, z, y, x) patch, centred in the patch between
    zeros as :func:`~scp_node.inference.runtime.window.sliding_window_logits` pads a study thinner
    than its window; the target is -1 (not learnt) outside the run."""
    depth = int(image.shape[1])
    count = int(rng.integers(min(_SLAB_MIN_SLICES, depth), depth))
    start = int(rng.integers(0, depth - count + 1))
    before = (depth - count) // 2
    slab_image = torch.zeros_like(image)
    slab_target = torch.full_like(target, -1)
    slab_image[:, before : before + count] = image[:, start : start + count]
    slab_target[before : before + count] = target[start : start + count]
    return slab_image, slab_target


def _loss(
    logits: torch.Tensor, target: torch.Tensor, recipe: VolumeRecipe, dice: Any
) -> torch.Tensor:
    """Cross-entropy (ignoring -1) + MONAI's masked soft Dice over the foreground classes."""
    mask = (target >= 0).unsqueeze(1)
    labels = target.clamp(min=0).unsqueeze(1)
    loss: torch.Tensor = dice(logits, labels, mask=mask)
    if recipe.loss == "dice+wce" and bool(mask.any()):
        weight = (
            torch.tensor(recipe.ce_class_weights, device=logits.device)
            if recipe.ce_class_weights
            else None
        )
        loss = loss + F.cross_entropy(logits, target, weight=weight, ignore_index=-1)
    return loss


def train_volume(
    network: nn.Module,
    data: VolumeData,
    recipe: VolumeRecipe,
    *,
    seed: int = 0,
    max_minutes: float | None = None,
    device: str = "cpu",
) -> VolumeTrainResult:
    """Train ``network`` in place on ``data``'s patches (see the module docstring).

    Stops after ``recipe.steps`` steps or at ``max_minutes`` (then the result depends on
    machine speed). The learning rate follows a cosine from ``recipe.lr`` to 5 % of it
    over ``recipe.steps``, or over ``max_minutes`` when the time runs out first.
    """
    from monai.losses.dice import MaskedDiceLoss

    started = time.monotonic()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sampler = _PatchSampler(data, recipe, rng)
    augment = _augmentation(recipe, seed) if recipe.augment else None
    run_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else device)
    if device == "auto" and not torch.cuda.is_available():
        run_device = torch.device("cpu")
    network.to(run_device).train()
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
    )
    total = max(1, recipe.steps)
    dice = MaskedDiceLoss(
        include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1.0
    )
    stopped, steps, last = "steps", 0, float("nan")
    for steps in range(1, total + 1):
        images, targets = [], []
        for _ in range(recipe.batch_size):
            image, target = sampler.patch()
            if augment is not None:
                with warnings.catch_warnings():
                    # MONAI's elastic transform uses a deprecated torch grid API on CPU.
                    warnings.simplefilter("ignore", UserWarning)
                    out = augment({"image": image.clone(), "label": (target + 1)[None].float()})
                image = torch.as_tensor(out["image"]).float()
                target = torch.as_tensor(out["label"])[0].round().long() - 1
            if recipe.slab_fraction > 0 and rng.random() < recipe.slab_fraction:
                image, target = thin_slab(image, target, rng)
            images.append(image)
            targets.append(target)
        inputs = torch.stack(images).to(run_device)
        labels = torch.stack(targets).to(run_device)
        loss = _loss(network(inputs).float(), labels, recipe, dice)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        # Cosine to 5 % over the steps, or over the time limit when that comes first.
        progress = steps / total
        if max_minutes is not None:
            progress = max(progress, (time.monotonic() - started) / 60 / max_minutes)
        for group in optimiser.param_groups:
            group["lr"] = recipe.lr * (0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, progress))))
        last = float(loss.detach())
        if steps % 50 == 0:
            logger.info("step %d: loss %.4f", steps, last)
        if max_minutes is not None and (time.monotonic() - started) / 60 >= max_minutes:
            stopped = "time limit"
            break
    network.cpu().eval()
    return VolumeTrainResult(
        steps=steps,
        minutes=(time.monotonic() - started) / 60,
        stopped=stopped,
        last_loss=last,
        parameters=sum(p.numel() for p in network.parameters()),
    )


def coded_labels(names: list[str]) -> list[dict[str, Any]]:
    """``[[labels]]`` tables (values 1, 2, ... in order) coded from TotalSegmentator's table.

    Raises
    ------
    ModelError
        A name has no known SNOMED CT code.
    """
    from scp_node.inference.formats.codes import label_colour, structure_codes

    tables = []
    for value, name in enumerate(names, start=1):
        codes = structure_codes(name)
        if codes is None:
            raise ModelError(f"label {name!r}: no SNOMED CT code known for this structure")
        tables.append(
            {"value": value, "name": name, "color": list(label_colour(value, name)), **codes}
        )
    return tables


def _write(path: Path, text: str) -> None:
    partial = path.with_suffix(path.suffix + ".part")
    partial.write_text(text)
    os.replace(partial, path)


def write_volume_model(
    run_dir: Path, network: nn.Module, recipe: VolumeRecipe, extra: Mapping[str, Any], name: str
) -> None:
    """Write the row's model folder: ``model.toml`` plus the nnU-Net folder or TorchScript."""
    run_dir.mkdir(parents=True, exist_ok=True)
    header = [
        f"name = {toml_value(name[:64])}",
        'version = "0"',
        f"series_description = {toml_value(('AI ' + recipe.kind)[:64])}",
    ]
    if recipe.kind == "nnunet3d":
        folder = run_dir / NNUNET_FOLDER
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        _write(folder / "plans.json", json.dumps(extra["plans"], indent=2))
        _write(folder / "dataset.json", json.dumps(extra["dataset"], indent=2))
        checkpoint = {
            "network_weights": network.state_dict(),
            "init_args": {
                "plans": extra["plans"],
                "configuration": "3d_fullres",
                "fold": 0,
                "dataset_json": extra["dataset"],
            },
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        }
        partial = folder / "fold_0" / "checkpoint_final.pth.part"
        torch.save(checkpoint, partial)
        os.replace(partial, folder / "fold_0" / "checkpoint_final.pth")
        lines = [
            'format = "nnunetv2"',
            *header,
            "",
            "[nnunet]",
            f'folder = "{NNUNET_FOLDER}"',
            'orientation = "RAS"',
        ]
    else:
        example = torch.zeros(1, 1, *recipe.patch)
        with warnings.catch_warnings(), torch.inference_mode():
            # The 2-D network's padding branch is fixed by the (constant) window size; torch
            # 2.13 marks tracing deprecated, but TorchScript (or ONNX) is what the node's
            # volume card loads.
            warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean")
            warnings.filterwarnings("ignore", r".*torch\.jit\.(trace|save).*", DeprecationWarning)
            traced = torch.jit.trace(network.eval(), example)  # type: ignore[no-untyped-call]
            partial = run_dir / (HYBRID_WEIGHTS + ".part")
            torch.jit.save(traced, str(partial))
        os.replace(partial, run_dir / HYBRID_WEIGHTS)
        lines = [
            'kind = "volume"',
            'format = "card"',
            *header,
            "",
            "[weights]",
            'format = "torchscript"',
            f'file = "{HYBRID_WEIGHTS}"',
            "",
            "[volume]",
            f"spacing_mm = {toml_value([recipe.spacing_mm] * 3)}",
            f"patch_size = {toml_value(list(recipe.patch))}",
            "overlap = 0.5",
            'orientation = "LPS"',
            'normalisation = { kind = "window", center = 50.0, width = 400.0 }',
        ]
        for table in coded_labels(list(recipe.labels)):
            lines += ["", "[[labels]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    _write(run_dir / "model.toml", "\n".join(lines) + "\n")


def train_volume_row(
    run_dir: Path,
    data_dir: Path,
    recipe: VolumeRecipe,
    *,
    name: str,
    seed: int = 0,
    max_minutes: float | None = None,
    device: str = "cpu",
) -> VolumeTrainResult:
    """Prepare subject A, train the row's network, write its model folder into ``run_dir``."""
    data = prepare_volume_data(recipe, data_dir)
    torch.manual_seed(seed)
    network = build_volume_network(recipe, data.extra)
    logger.info(
        "training %s (%d parameters) on %s, patch %s",
        recipe.kind,
        sum(p.numel() for p in network.parameters()),
        recipe.subject,
        recipe.patch,
    )
    result = train_volume(network, data, recipe, seed=seed, max_minutes=max_minutes, device=device)
    write_volume_model(run_dir, network, recipe, data.extra, name)
    return result
