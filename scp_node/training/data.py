"""Training data: NIfTI subjects reoriented to the predictor's input convention, the
training configuration (``train.toml``), and a seeded crop sampler with augmentation.

The predictor sees DICOM pixel arrays of axial series: (z, y, x) with x towards patient
Left, y towards Posterior and z towards Superior (LPS). NIfTI files are usually RAS, so
they are reoriented here with nibabel so that training slices look exactly like inference
slices (a left-right or anterior-posterior flip would otherwise be learnt).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from scp_node.errors import ModelError
from scp_node.inference.preprocess import normalise, resample_inplane, resampled_shape

__all__ = [
    "LOSSES",
    "CropSampler",
    "Subject",
    "TrainConfig",
    "elastic_displacement",
    "load_nifti_zyx",
    "load_subject",
    "monai_augmentation",
    "split_slices",
]

TRAIN_FILE = "train.toml"

#: Values of ``[train] loss`` in ``train.toml``.
LOSSES = ("dice+wce", "dice")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run, read from ``models/<name>/train.toml``.

    ``labels`` maps each output class (in order, class 1 first) to its value in the source
    label files. Input preparation (spacing, window, context) must match the model card.
    """

    subject: str
    image_file: str
    labels_file: str
    labels: dict[str, int]
    architecture: str
    params: dict[str, Any]
    spacing_mm: tuple[float, float] = (3.0, 3.0)
    window_center: float | None = 50.0
    window_width: float | None = 400.0
    context_slices: int = 0
    crop_size: int = 64
    batch_size: int = 16
    epochs: int = 40
    steps_per_epoch: int = 50
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    ce_class_weights: tuple[float, ...] = ()
    dice_weight: float = 1.0
    #: Loss: ``"dice+wce"`` (soft Dice + cross-entropy weighted by ``ce_class_weights``) or
    #: ``"dice"`` (soft Dice alone); see :func:`scp_node.training.train.make_loss`.
    loss: str = "dice+wce"
    #: Weight of the edge term (mean absolute difference between neighbouring pixels of the
    #: foreground probabilities); 0 disables it. The notes propose 0.1-0.5.
    edge_weight: float = 0.0
    foreground_fraction: float = 0.6
    patience: int = 10
    val_block: int = 5
    val_every: int = 5
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    intensity_jitter: float = 0.05
    noise_std: float = 0.02
    #: Elastic deformation: standard deviation (pixels) of a smooth random displacement
    #: field (a 4x4 grid of random vectors, interpolated bicubically); 0 disables it.
    elastic_px: float = 0.0
    #: Strong augmentation with MONAI's transforms on top of the above (multi-organ rows):
    #: elastic deformation, simulated low resolution, gamma contrast, blur and noise.
    monai_augment: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> TrainConfig:
        """Parse a ``train.toml``.

        Raises
        ------
        ModelError
            The file is missing, not TOML, or lacks a required key (the message names it).
        """
        try:
            with path.open("rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ModelError(f"no {path.name} in {path.parent}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ModelError(f"{path}: not valid TOML: {exc}") from exc
        try:
            data = raw["data"]
            network = raw["network"]
            inputs = raw.get("input", {})
            train = dict(raw.get("train", {}))
            for key in ("spacing_mm", "scale_range", "ce_class_weights"):
                if key in inputs:
                    inputs[key] = tuple(inputs[key])
                if key in train:
                    train[key] = tuple(train[key])
            config = cls(
                subject=data["subject"],
                image_file=data.get("image", "ct.nii.gz"),
                labels_file=data.get("labels", "labels.nii.gz"),
                labels={str(k): int(v) for k, v in raw["labels"].items()},
                architecture=network["architecture"],
                params=dict(network.get("params", {})),
                **inputs,
                **train,
            )
        except KeyError as exc:
            raise ModelError(f"{path}: missing key {exc}") from exc
        except TypeError as exc:
            raise ModelError(f"{path}: {exc}") from exc
        if config.loss not in LOSSES:
            raise ModelError(f"{path}: loss {config.loss!r} is not one of {', '.join(LOSSES)}")
        if config.edge_weight < 0:
            raise ModelError(f"{path}: edge_weight must be >= 0, got {config.edge_weight}")
        return config

    @property
    def num_classes(self) -> int:
        """Output classes including background."""
        return len(self.labels) + 1


def load_nifti_zyx(path: Path) -> tuple[npt.NDArray[Any], tuple[float, float, float]]:
    """A NIfTI volume as a (z, y, x) array in the predictor's convention.

    Returns
    -------
    tuple
        ``(array, spacing_zyx)``: the array indexed (z, y, x) with x -> patient Left,
        y -> Posterior, z -> Superior (the DICOM pixel order of an axial series), in the
        file's dtype; the voxel spacing in mm for (z, y, x).
    """
    # nibabel's typing is partial: its loaders return the untyped base class.
    image: Any = nib.load(path)
    orientations: Any = nib.orientations
    transform = orientations.ornt_transform(
        orientations.io_orientation(image.affine), orientations.axcodes2ornt(("L", "P", "S"))
    )
    reoriented = image.as_reoriented(transform)
    zooms = reoriented.header.get_zooms()
    array = np.asanyarray(reoriented.dataobj).transpose(2, 1, 0)
    return np.ascontiguousarray(array), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


@dataclass(frozen=True)
class Subject:
    """A subject prepared for training at the model's in-plane spacing.

    ``image`` is (z, rows, columns) float32 in [0, 1] (normalised), ``target`` the same
    shape uint8 class indices (0 background, i for ``TrainConfig.labels``' i-th entry).
    """

    image: npt.NDArray[np.float32]
    target: npt.NDArray[np.uint8]
    spacing_zyx: tuple[float, float, float]


def load_subject(data_dir: Path, config: TrainConfig) -> Subject:
    """Load ``data_dir/<subject>/`` image and labels, reorient, normalise, resample in-plane."""
    folder = data_dir / config.subject
    image, spacing = load_nifti_zyx(folder / config.image_file)
    labels, _ = load_nifti_zyx(folder / config.labels_file)
    target = np.zeros(labels.shape, dtype=np.uint8)
    for index, source_value in enumerate(config.labels.values(), start=1):
        target[labels == source_value] = index
    normalised = normalise(image.astype(np.float32), config.window_center, config.window_width)
    size = resampled_shape(image.shape[1:], spacing[1:], config.spacing_mm)
    resampled = resample_inplane(torch.from_numpy(normalised), size).numpy()
    target_t = resample_inplane(torch.from_numpy(target), size, mode="nearest").numpy()
    new_spacing = (
        spacing[0],
        spacing[1] * image.shape[1] / size[0],
        spacing[2] * image.shape[2] / size[1],
    )
    return Subject(image=resampled, target=target_t.astype(np.uint8), spacing_zyx=new_spacing)


def split_slices(num_slices: int, block: int, every: int) -> tuple[list[int], list[int]]:
    """Split slice indices into (train, validation) by contiguous blocks.

    Every ``every``-th block of ``block`` slices goes to validation, so neighbouring (almost
    identical) slices rarely straddle the split.
    """
    train: list[int] = []
    val: list[int] = []
    for index in range(num_slices):
        (val if (index // block) % every == 0 else train).append(index)
    return train, val


def elastic_displacement(
    rng: np.random.Generator, batch_size: int, size: int, sigma_px: float, grid: int = 4
) -> npt.NDArray[np.float64]:
    """Smooth random displacement fields for elastic augmentation.

    Parameters
    ----------
    rng
        Source of randomness (seeded by the caller).
    batch_size, size
        Number of fields and their (square) size in pixels.
    sigma_px
        Standard deviation of the control-point displacements, in pixels.
    grid
        Control points per side; fewer points give smoother, larger-scale warps.

    Returns
    -------
    numpy.ndarray
        (batch_size, 2, size, size) float64: row and column displacement in pixels.
    """
    coarse = rng.standard_normal((batch_size, 2, grid, grid)) * sigma_px
    fine = F.interpolate(
        torch.from_numpy(coarse), size=(size, size), mode="bicubic", align_corners=True
    )
    out: npt.NDArray[np.float64] = fine.numpy()
    return out


class CropSampler:
    """Random augmented crops from a set of slices, reproducible from a numpy Generator.

    Each crop is centred on a foreground pixel with probability ``foreground_fraction``
    (else anywhere), rotated by up to ``rotation_deg`` and scaled within ``scale_range``
    (one bilinear resampling for the image, nearest for the target), then contrast,
    brightness and noise are jittered; with ``elastic_px`` > 0 the sampling grid is also
    warped by a smooth random field (:func:`elastic_displacement`). Left-right and
    anterior-posterior flips are not used: they would change the anatomy's sides.
    """

    def __init__(
        self,
        subject: Subject,
        slices: Sequence[int],
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> None:
        self.config = config
        self.rng = rng
        self.slices = np.asarray(slices, dtype=np.int64)
        context = config.context_slices
        depth = subject.image.shape[0]
        offsets = np.arange(-context, context + 1)
        self._context_index = np.clip(self.slices[:, None] + offsets[None, :], 0, depth - 1)
        self.image = torch.from_numpy(subject.image)
        self.target = torch.from_numpy(subject.target.astype(np.float32))
        foreground = [np.argwhere(subject.target[z] > 0) for z in self.slices]
        self._foreground = foreground
        self._has_foreground = np.asarray([len(f) > 0 for f in foreground])
        self._monai = (
            monai_augmentation(int(rng.integers(2**31 - 1))) if config.monai_augment else None
        )

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch: input (B, C, crop, crop) float32 and target (B, crop, crop) int64."""
        cfg = self.config
        rng = self.rng
        height, width = self.image.shape[1:]
        crop = cfg.crop_size
        picks = rng.integers(0, len(self.slices), size=batch_size)
        want_fg = rng.random(batch_size) < cfg.foreground_fraction
        fg_slices = np.flatnonzero(self._has_foreground)
        centres = np.empty((batch_size, 2), dtype=np.float64)
        for b in range(batch_size):
            if want_fg[b] and len(fg_slices):
                picks[b] = fg_slices[rng.integers(0, len(fg_slices))]
                points = self._foreground[picks[b]]
                centres[b] = points[rng.integers(0, len(points))]
            else:
                centres[b] = (rng.uniform(0, height - 1), rng.uniform(0, width - 1))
        angles = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, batch_size))
        scales = rng.uniform(cfg.scale_range[0], cfg.scale_range[1], batch_size)
        # Output pixel offsets from the crop centre, rotated and scaled into the slice.
        offsets = np.arange(crop, dtype=np.float64) - (crop - 1) / 2.0
        dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
        cos = (np.cos(angles) * scales)[:, None, None]
        sin = (np.sin(angles) * scales)[:, None, None]
        rows = centres[:, 0, None, None] + cos * dy - sin * dx
        cols = centres[:, 1, None, None] + sin * dy + cos * dx
        if cfg.elastic_px > 0:
            displacement = elastic_displacement(rng, batch_size, crop, cfg.elastic_px)
            rows = rows + displacement[:, 0]
            cols = cols + displacement[:, 1]
        grid = np.stack([(2 * cols + 1) / width - 1, (2 * rows + 1) / height - 1], axis=-1)
        grid_t = torch.from_numpy(grid.astype(np.float32))
        channels = self.image[torch.from_numpy(self._context_index[picks])]
        inputs = F.grid_sample(channels, grid_t, mode="bilinear", align_corners=False)
        targets = F.grid_sample(
            self.target[torch.from_numpy(self.slices[picks])].unsqueeze(1),
            grid_t,
            mode="nearest",
            align_corners=False,
        )
        contrast = rng.uniform(
            1 - cfg.intensity_jitter * 2, 1 + cfg.intensity_jitter * 2, batch_size
        )
        brightness = rng.uniform(-cfg.intensity_jitter, cfg.intensity_jitter, batch_size)
        noise_scale = rng.uniform(0, cfg.noise_std, batch_size)
        noise = rng.standard_normal(inputs.shape).astype(np.float32) * noise_scale[
            :, None, None, None
        ].astype(np.float32)
        inputs = (
            inputs * torch.from_numpy(contrast.astype(np.float32))[:, None, None, None]
            + torch.from_numpy(brightness.astype(np.float32))[:, None, None, None]
            + torch.from_numpy(noise)
        ).clamp_(0.0, 1.0)
        labels = targets.squeeze(1).round().long()
        if self._monai is not None:
            inputs, labels = _apply_monai(self._monai, inputs, labels)
        return inputs.contiguous(), labels


def monai_augmentation(seed: int) -> Any:
    """MONAI's strong 2-D augmentation of one crop (``image`` (C, H, W), ``label`` (1, H, W)).

    Elastic deformation (image bilinear, label nearest), simulated low resolution, gamma
    contrast, Gaussian blur and noise; seeded, so a run stays reproducible.
    """
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.dictionary import (
        RandAdjustContrastd,
        RandGaussianNoised,
        RandGaussianSmoothd,
    )
    from monai.transforms.spatial.dictionary import Rand2DElasticd, RandSimulateLowResolutiond

    image = ("image",)
    transforms = Compose(
        [
            Rand2DElasticd(
                ("image", "label"),
                spacing=(16, 16),
                magnitude_range=(1, 3),
                prob=0.3,
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandSimulateLowResolutiond(
                image, prob=0.25, zoom_range=(0.5, 1.0), upsample_mode="bilinear"
            ),
            RandAdjustContrastd(image, prob=0.3, gamma=(0.7, 1.5)),
            RandGaussianSmoothd(image, prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0)),
            RandGaussianNoised(image, prob=0.3, std=0.03),
        ]
    )
    transforms.set_random_state(seed=seed)
    return transforms


def _apply_monai(
    transforms: Any, inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for image, label in zip(inputs, labels, strict=True):
        out = transforms({"image": image, "label": label[None].float()})
        images.append(torch.as_tensor(out["image"]).float().clamp(0.0, 1.0))
        targets.append(torch.as_tensor(out["label"])[0].round().long())
    return torch.stack(images), torch.stack(targets)
