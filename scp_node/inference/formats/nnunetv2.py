"""nnU-Net v2 trained-model folders, run unchanged.

A folder ``<trainer>__<plans>__<configuration>/`` holds ``dataset.json``, ``plans.json`` and
``fold_N/checkpoint_final.pth``. The node reproduces ``nnUNetPredictor``'s inference:
nnU-Net's own preprocessing (transpose per plans, crop to the non-zero box, its
normalisation from ``foreground_intensity_properties_per_channel``, resampling to the
configuration's spacing) via :class:`DefaultPreprocessor`, or for CT slab by slab from the
source's int16 with the same result (:meth:`NnunetModel.prepare`), the network from the plans'
``architecture`` built with ``dynamic_network_architectures`` (run on the CPU by
:class:`~scp_node.inference.formats.lean_unet.LeanUNet`: same layers, less memory), and the
sliding window, fold averaging and resampling back done by
:mod:`scp_node.inference.runtime.volume`.

Security: a model folder is data. Checkpoints load with ``torch.load(weights_only=True)``
and only the numpy scalar types nnU-Net's training log holds are allow-listed; the network
class and the classes its keyword arguments name must be on :data:`ARCHITECTURES` and
:data:`LAYER_CLASSES` (nnU-Net itself imports whatever a plans file names).
"""

from __future__ import annotations

import json
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.formats.codes import label_colour, structure_codes
from scp_node.inference.formats.lean_unet import LeanUNet
from scp_node.inference.runtime.volume import Prepared

__all__ = [
    "ARCHITECTURES",
    "LAYER_CLASSES",
    "NnunetModel",
    "complete_card",
    "load_checkpoint",
    "load_nnunet",
]

logger = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
PLANS_JSON = "plans.json"

#: Network classes a plans file may name (nnU-Net's own architectures).
ARCHITECTURES = frozenset(
    {
        "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet",
    }
)

#: Classes a plans file may name as architecture arguments (``_kw_requires_import``), by
#: their full module path and by their ``torch.nn`` alias (plans use both).
_LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "instancenorm": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    "batchnorm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "activation": (nn.LeakyReLU, nn.ReLU, nn.GELU, nn.PReLU),
    "dropout": (nn.Dropout, nn.Dropout2d, nn.Dropout3d),
}
LAYER_CLASSES: dict[str, type[nn.Module]] = {
    name: cls
    for module, classes in _LAYERS.items()
    for cls in classes
    for name in (f"torch.nn.modules.{module}.{cls.__name__}", f"torch.nn.{cls.__name__}")
}


def _safe_globals() -> list[Any]:
    """What an nnU-Net checkpoint may hold besides tensors: numpy scalars in its log."""
    from numpy._core.multiarray import scalar

    return [
        scalar,
        np.dtype,
        np.dtypes.Float64DType,
        np.dtypes.Float32DType,
        np.dtypes.Int64DType,
        np.dtypes.BoolDType,
    ]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an nnU-Net checkpoint as data.

    Parameters
    ----------
    path
        ``fold_N/checkpoint_final.pth``.

    Returns
    -------
    dict
        The checkpoint; ``network_weights`` is the state dict.

    Raises
    ------
    ModelError
        The file cannot be read, needs arbitrary pickle (it would run code: refused, the
        message names the file and the object), or holds no ``network_weights``.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next(
            (line.strip() for line in str(exc).splitlines() if "GLOBAL" in line),
            str(exc).splitlines()[0] if str(exc) else "",
        )
        raise ModelError(
            f"{path}: refused: the checkpoint needs arbitrary pickle to load, which could run "
            f"code ({detail}); only tensors and numpy scalars are accepted"
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise ModelError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"nnU-Net folder incomplete: {path} not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object")
    return data


def _folder(card: Path, raw: dict[str, Any]) -> Path:
    table = raw.get("nnunet") or {}
    folder = Path(str(table.get("folder", ".")))
    return folder if folder.is_absolute() else card.parent / folder


def _label_values(dataset: dict[str, Any], path: Path) -> dict[str, int]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelError(f"{path}: key 'labels' missing or empty")
    out: dict[str, int] = {}
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(
                f"{path}: labels.{name}: region-based labels ({value!r}) are not supported"
            )
        out[str(name)] = value
    return out


def complete_card(card: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Fill a ``format = "nnunetv2"`` card's tables from its folder.

    The card may be as small as ``format = "nnunetv2"`` plus ``[nnunet] folder``: the name
    defaults to the model directory's, the version to ``"1"``, the labels come from
    ``dataset.json`` coded with :func:`structure_codes` (a card's own ``[[labels]]`` win),
    the modality from its ``channel_names``.

    Parameters
    ----------
    card
        Path of ``model.toml`` (for messages and relative folders).
    raw
        The parsed card.

    Returns
    -------
    dict
        The card with ``kind``, ``weights``, ``labels``, ``input`` and ``series`` filled.

    Raises
    ------
    ModelError
        A file of the folder is missing or unreadable, the configuration or a fold is not
        there, a label is region-based, or a label has no known code and the card gives
        none (the message names the file and the key).
    """
    raw = dict(raw)
    folder = _folder(card, raw)
    if not folder.is_dir():
        raise ModelError(f"{card}: nnunet.folder {folder} is not a directory")
    dataset_path, plans_path = folder / DATASET_JSON, folder / PLANS_JSON
    dataset, plans = _read_json(dataset_path), _read_json(plans_path)
    table = dict(raw.get("nnunet") or {})
    configuration = table.get("configuration") or folder.resolve().name.rsplit("__", 1)[-1]
    if configuration not in (plans.get("configurations") or {}):
        raise ModelError(
            f"{plans_path}: configurations.{configuration} not found "
            f"(set nnunet.configuration in {card})"
        )
    table["configuration"] = configuration
    checkpoint = str(table.get("checkpoint", "checkpoint_final.pth"))
    for fold in table.get("folds", [0]):
        path = folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise ModelError(f"{card}: nnunet.folds: {path} not found")
    raw["nnunet"] = table
    raw.setdefault("name", card.parent.name)
    raw.setdefault("version", "1")
    raw["kind"] = "volume"
    # Relative to the model directory, as every card's weights file is.
    raw["weights"] = {"format": "nnunetv2", "file": str(table.get("folder", "."))}
    channels = dataset.get("channel_names") or dataset.get("modality") or {}
    first = str(next(iter(channels.values()), "CT")) if isinstance(channels, dict) else "CT"
    modality = "CT" if first.upper() == "CT" else "MR"
    # [input] only feeds the dashboard preview here: a CT window, or min-max for MR.
    preview = {} if modality == "CT" else {"window_center": None, "window_width": None}
    raw.setdefault("input", {"modality": modality, **preview})
    raw.setdefault("series", {"modalities": [modality]})
    if "labels" not in raw:
        raw["labels"] = _coded_labels(_label_values(dataset, dataset_path), dataset_path, card)
    return raw


def _coded_labels(values: dict[str, int], dataset_path: Path, card: Path) -> list[dict[str, Any]]:
    labels: list[dict[str, Any]] = []
    for name, value in values.items():
        if value == 0:
            continue
        codes = structure_codes(name)
        if codes is None or "category" not in codes or "type" not in codes:
            raise ModelError(
                f"{dataset_path}: labels.{name}: no SNOMED CT code known for this structure; "
                f"give the codes as [[labels]] in {card}"
            )
        labels.append({"value": value, "name": name, "color": label_colour(value, name), **codes})
    return labels


def _spline_matrix(n_in: int, n_out: int, order: int) -> torch.Tensor:
    """(n_out, n_in) float32: ``skimage.transform.resize`` of a 1-D signal of ``n_in``
    samples to ``n_out`` (spline ``order``, edge mode, no anti-aliasing, no clipping) as a
    matrix, found by resizing the unit impulses."""
    from skimage.transform import resize

    impulses = np.eye(n_in)
    columns = resize(  # type: ignore[no-untyped-call]
        impulses, (n_out, n_in), order=order, mode="edge", anti_aliasing=False, clip=False
    )
    return torch.from_numpy(np.ascontiguousarray(columns)).float()


def _separable_resample(
    data: npt.NDArray[np.float32], new_shape: Any, order: int
) -> npt.NDArray[np.float32]:
    """nnU-Net's ``resample_data_or_seg_to_shape`` of an image without separate z, axis by
    axis.

    nnU-Net resizes with ``skimage.transform.resize`` (``scipy.ndimage.zoom``): a spline
    prefilter along every axis of the whole float64 volume, then a 4x4x4 evaluation per
    output voxel, on one core. A B-spline resize is a tensor product of one 1-D linear
    map per axis, so the same result comes from three matrix products in float32 on all
    torch threads, the largest axis shrinking first; the output is clipped to the input's
    range as ``resize`` clips it.
    """
    target = [int(n) for n in new_shape]
    out = np.empty((data.shape[0], *target), dtype=np.float32)
    for channel in range(data.shape[0]):
        volume = torch.from_numpy(np.ascontiguousarray(data[channel], dtype=np.float32))
        low, high = volume.min(), volume.max()
        z, y, x = (int(n) for n in volume.shape)
        if x != target[2]:
            volume = torch.matmul(volume.reshape(-1, x), _spline_matrix(x, target[2], order).T)
            x = target[2]
        volume = volume.reshape(z, y, x)
        if y != target[1]:
            volume = torch.matmul(_spline_matrix(y, target[1], order), volume)
            y = target[1]
        if z != target[0]:
            volume = torch.matmul(_spline_matrix(z, target[0], order), volume.reshape(z, y * x))
        out[channel] = torch.clamp(volume.reshape(target), low, high).numpy()
    return out


#: Largest float32 slab of the source volume the streamed preprocessing holds at once.
_SLAB_BYTES = 64 * 2**20


def _slab(shape: tuple[int, ...]) -> int:
    """Slices along axis 0 per slab of the streamed preprocessing."""
    return max(1, _SLAB_BYTES // max(1, 4 * int(np.prod(shape[1:]))))


def _nonzero_box(volume: npt.NDArray[Any]) -> tuple[slice, slice, slice] | None:
    """nnU-Net's ``crop_to_nonzero`` box of a (z, y, x) volume, slab by slab.

    nnU-Net fills the holes of the non-zero mask before taking its bounding box; a hole
    lies inside the box, so the box of the non-zero voxels is the same, and no full-size
    mask is needed. ``None`` when every voxel is zero.
    """
    rows = np.zeros(volume.shape[0], dtype=bool)
    plane = np.zeros(volume.shape[1:], dtype=bool)
    step = _slab(volume.shape)
    for z0 in range(0, volume.shape[0], step):
        nonzero = volume[z0 : z0 + step] != 0
        rows[z0 : z0 + step] = nonzero.any(axis=(1, 2))
        plane |= nonzero.any(axis=0)
    if not rows.any():
        return None
    (z,) = np.nonzero(rows)
    y = np.nonzero(plane.any(axis=1))[0]
    x = np.nonzero(plane.any(axis=0))[0]
    return (
        slice(int(z[0]), int(z[-1]) + 1),
        slice(int(y[0]), int(y[-1]) + 1),
        slice(int(x[0]), int(x[-1]) + 1),
    )


def _streamed_resample(
    volume: npt.NDArray[Any], normalise: Any, new_shape: Any, order: int
) -> npt.NDArray[np.float32]:
    """``_separable_resample(normalise(volume as float32))`` without a float32 copy of
    ``volume``: each slab of source slices is converted, normalised (voxel by voxel) and
    resampled in-plane, then the whole (small) in-plane-resampled stack along z, and the
    result clipped to the normalised range; the same products in the same order."""
    target = [int(n) for n in new_shape]
    z, y, x = (int(n) for n in volume.shape)
    across_x = _spline_matrix(x, target[2], order).T if x != target[2] else None
    along_y = _spline_matrix(y, target[1], order) if y != target[1] else None
    planes = np.empty((z, target[1], target[2]), dtype=np.float32)
    low, high = np.inf, -np.inf
    step = _slab(volume.shape)
    for z0 in range(0, z, step):
        chunk = normalise(np.array(volume[z0 : z0 + step], dtype=np.float32))
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
        depth = int(chunk.shape[0])
        slab = torch.from_numpy(chunk)
        if across_x is not None:
            slab = torch.matmul(slab.reshape(-1, x), across_x)
        slab = slab.reshape(depth, y, target[2])
        if along_y is not None:
            slab = torch.matmul(along_y, slab)
        planes[z0 : z0 + depth] = slab.numpy()
        del chunk, slab
    stack = torch.from_numpy(planes)
    if z != target[0]:
        stack = torch.matmul(_spline_matrix(z, target[0], order), stack.reshape(z, -1))
    return torch.clamp(stack.reshape(target), low, high).numpy()


class _SeparableResampling:
    """A configuration manager for inference: images resampled by
    :func:`_separable_resample` where that is nnU-Net's own resampling, by nnU-Net's
    otherwise (separate z, other functions); no segmentation resampled (there is none at
    inference); everything else is the wrapped manager's."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    @property
    def resampling_fn_seg(self) -> Any:
        """Leaves the segmentation as it is: at inference ``crop_to_nonzero`` makes one
        from the non-zero mask, which nnU-Net resamples (seconds) and then drops."""

        def keep(seg: Any, *_args: Any) -> Any:
            return seg

        return keep

    def spline_order(self, current: Any, new: Any) -> int | None:
        """Spline order of nnU-Net's image resampling from spacing ``current`` to ``new``
        when :func:`_separable_resample` reproduces it, else ``None`` (separate z, another
        resampling function)."""
        from nnunetv2.configuration import ANISO_THRESHOLD
        from nnunetv2.preprocessing.resampling.default_resampling import (
            determine_do_sep_z_and_axis,
        )

        configuration = self._manager.configuration
        kwargs = dict(configuration.get("resampling_fn_data_kwargs") or {})
        if configuration.get("resampling_fn_data") != "resample_data_or_seg_to_shape" or (
            kwargs.get("is_seg", False)
        ):
            return None
        separate, _axis = determine_do_sep_z_and_axis(
            kwargs.get("force_separate_z", False),
            current,
            new,
            kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD),
        )
        return None if separate else int(kwargs.get("order", 3))

    @property
    def resampling_fn_data(self) -> Any:
        own = self._manager.resampling_fn_data

        def resample(
            data: npt.NDArray[np.float32], new_shape: Any, current: Any, new: Any
        ) -> npt.NDArray[np.float32]:
            order = self.spline_order(current, new)
            if order is None or data.ndim != 4:
                return np.asarray(own(data, new_shape, current, new))
            if tuple(data.shape[1:]) == tuple(int(n) for n in new_shape):
                return data
            return _separable_resample(data, new_shape, order)

        return resample


class NnunetModel:
    """One configuration of an nnU-Net folder, its folds loaded, ready for the volume runtime.

    Built by :func:`load_nnunet`. Attributes follow
    :class:`~scp_node.inference.runtime.volume.VolumeModel`.
    """

    def __init__(
        self,
        networks: tuple[nn.Module, ...],
        plans_manager: Any,
        configuration_manager: Any,
        dataset_json: dict[str, Any],
        *,
        tile_step_size: float,
        mirror_axes: tuple[int, ...],
        orientation: str,
    ) -> None:
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import (
            DefaultPreprocessor,
        )

        self.networks = networks
        self._plans = plans_manager
        self._configuration = configuration_manager
        self._dataset = dataset_json
        self._preprocessor = DefaultPreprocessor(verbose=False)
        self._resampling = _SeparableResampling(configuration_manager)
        patch = [int(p) for p in configuration_manager.patch_size]
        self.patch_size: tuple[int, int, int] = (patch[0], patch[1], patch[2])
        self.tile_step_size = tile_step_size
        self.mirror_axes = mirror_axes
        self.orientation = orientation
        label_manager = plans_manager.get_label_manager(dataset_json)
        self.class_values: tuple[int, ...] = tuple(int(v) for v in label_manager.all_labels)

    def prepare(
        self, volume: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]
    ) -> Prepared:
        """nnU-Net's preprocessing of one single-channel (z, y, x) volume (any real dtype).

        With a voxel-wise normalisation (CT) and nnU-Net's default resampling without
        separate z, done slab by slab (:meth:`_prepare_streamed`): memory stays near the
        network-grid array whatever the study's length. Otherwise by nnU-Net's own
        ``DefaultPreprocessor``, which holds a float32 copy of the volume.
        """
        from nnunetv2.preprocessing.resampling.default_resampling import get_do_separate_z

        transpose = tuple(int(a) for a in self._plans.transpose_forward)
        current = [float(spacing_zyx[i]) for i in transpose]
        target = [float(s) for s in self._configuration.spacing]
        prepared = self._prepare_streamed(volume.transpose(transpose), current, target)
        if prepared is None:
            properties: dict[str, Any] = {"spacing": [float(s) for s in spacing_zyx]}
            with warnings.catch_warnings():
                # nnU-Net's resampling warns about its own deprecated scipy/skimage uses.
                warnings.simplefilter("ignore")
                data, _seg, properties = self._preprocessor.run_case_npy(
                    volume[None], None, properties, self._plans, self._resampling, self._dataset
                )
            (z0, z1), (y0, y1), (x0, x1) = properties["bbox_used_for_cropping"]
            bbox = (slice(int(z0), int(z1)), slice(int(y0), int(y1)), slice(int(x0), int(x1)))
            crop_shape = _triple(properties["shape_after_cropping_and_before_resampling"])
            full_shape = _triple(properties["shape_before_cropping"])
            prepared = (np.ascontiguousarray(data, dtype=np.float32), bbox, crop_shape)
            del data, _seg
        else:
            full_shape = _triple(volume.transpose(transpose).shape)
        # nnU-Net resamples logits back with order 0 along a much coarser axis.
        nearest_axis: int | None = None
        for spacing in (target, current):
            if get_do_separate_z(spacing):
                axes = np.where(max(spacing) / np.array(spacing) == 1)[0]
                if len(axes) == 1:
                    nearest_axis = int(axes[0])
                break
        data, bbox, crop_shape = prepared
        return Prepared(
            data=data,
            crop_shape=crop_shape,
            bbox=bbox,
            full_shape=full_shape,
            transpose_backward=_triple(self._plans.transpose_backward),
            nearest_axis=nearest_axis,
        )

    def _prepare_streamed(
        self, volume: npt.NDArray[Any], current: list[float], target: list[float]
    ) -> tuple[npt.NDArray[np.float32], tuple[slice, slice, slice], tuple[int, int, int]] | None:
        """``DefaultPreprocessor.run_case_npy`` slab by slab on a transposed (z, y, x)
        volume: crop to the non-zero box, normalise, resample (nnU-Net's order,
        :func:`_separable_resample`'s products). ``None`` where that is not nnU-Net's
        preprocessing of this volume (see :meth:`prepare`), or the volume is all zero."""
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import (
            CTNormalization,
            NoNormalization,
        )
        from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

        # Voxel by voxel: no statistics of the image itself, so slab by slab is the same.
        voxelwise = {"CTNormalization": CTNormalization, "NoNormalization": NoNormalization}
        schemes = list(self._configuration.normalization_schemes)
        if len(schemes) != 1 or schemes[0] not in voxelwise:
            return None
        order = self._resampling.spline_order(current, target)
        if order is None:
            return None
        bbox = _nonzero_box(volume)
        if bbox is None:
            return None
        cropped = volume[bbox]
        crop_shape = _triple(cropped.shape)
        new_shape = compute_new_shape(crop_shape, current, target)
        normaliser = voxelwise[schemes[0]](
            use_mask_for_norm=self._configuration.use_mask_for_norm[0],
            intensityproperties=self._plans.foreground_intensity_properties_per_channel["0"],
        )

        def normalise(slab: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return np.asarray(normaliser.run(slab, None), dtype=np.float32)

        if tuple(int(n) for n in new_shape) == crop_shape:
            data = np.empty((1, *crop_shape), dtype=np.float32)
            step = _slab(crop_shape)
            for z0 in range(0, crop_shape[0], step):
                data[0, z0 : z0 + step] = normalise(
                    np.array(cropped[z0 : z0 + step], dtype=np.float32)
                )
        else:
            data = _streamed_resample(cropped, normalise, new_shape, order)[None]
        return np.ascontiguousarray(data), bbox, crop_shape


def _triple(values: Any) -> tuple[int, int, int]:
    first, second, third = (int(v) for v in values)
    return first, second, third


def _build_network(
    configuration_manager: Any, input_channels: int, output_channels: int, where: Path
) -> nn.Module:
    """The plans' architecture, from the allow-lists only (never ``pydoc.locate``)."""
    import dynamic_network_architectures.architectures.unet as unet

    classes: dict[str, type[nn.Module]] = {
        "dynamic_network_architectures.architectures.unet.PlainConvUNet": unet.PlainConvUNet,
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": (
            unet.ResidualEncoderUNet
        ),
        "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet": (
            unet.ResidualEncoderUNet
        ),
    }
    name = str(configuration_manager.network_arch_class_name)
    if name not in classes:
        raise ModelError(
            f"{where}: architecture.network_class_name {name!r} is not an allowed "
            f"architecture ({', '.join(sorted(ARCHITECTURES))})"
        )
    kwargs = dict(configuration_manager.network_arch_init_kwargs)
    for key in configuration_manager.network_arch_init_kwargs_req_import:
        if kwargs.get(key) is None:
            continue
        if kwargs[key] not in LAYER_CLASSES:
            raise ModelError(
                f"{where}: architecture.arch_kwargs.{key} {kwargs[key]!r} is not an allowed "
                "layer class"
            )
        kwargs[key] = LAYER_CLASSES[kwargs[key]]
    kwargs["deep_supervision"] = False
    try:
        return classes[name](input_channels=input_channels, num_classes=output_channels, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(f"{where}: cannot build {name}: {exc}") from exc


def load_nnunet(
    folder: Path,
    configuration: str,
    folds: tuple[int | str, ...],
    *,
    checkpoint: str = "checkpoint_final.pth",
    mirroring: bool = False,
    tile_step_size: float = 0.5,
    orientation: str = "RAS",
    device: torch.device | None = None,
) -> NnunetModel:
    """Load ``folds`` of ``configuration`` from an nnU-Net v2 trained-model folder.

    Parameters
    ----------
    folder
        The trainer folder (``dataset.json``, ``plans.json``, ``fold_N/``).
    configuration
        A key of ``plans.json``'s ``configurations`` (``3d_fullres``, ...).
    folds
        Fold numbers (or ``"all"``); their logits are averaged.
    checkpoint
        File name inside each fold folder.
    mirroring
        Test-time mirroring along the checkpoint's ``inference_allowed_mirroring_axes``.
    tile_step_size
        Sliding-window step as a fraction of the patch.
    orientation
        Array orientation the folder was trained in (``RAS`` or ``LPS``).
    device
        Where the networks go (CPU by default).

    Returns
    -------
    NnunetModel

    Raises
    ------
    ModelError
        A file is missing or refused (see :func:`load_checkpoint`), the architecture is not
        allowed, or the weights do not fit it.
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset = _read_json(folder / DATASET_JSON)
    plans = _read_json(folder / PLANS_JSON)
    _label_values(dataset, folder / DATASET_JSON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old plans formats warn while being converted
        plans_manager = PlansManager(plans)
        try:
            configuration_manager = plans_manager.get_configuration(configuration)
        except (KeyError, RuntimeError) as exc:
            raise ModelError(
                f"{folder / PLANS_JSON}: configurations.{configuration}: {exc}"
            ) from exc
    if len(configuration_manager.patch_size) != 3:
        raise ModelError(
            f"{folder / PLANS_JSON}: configuration {configuration!r} is not 3-D; "
            "only 3-D configurations run in the volume runtime"
        )
    label_manager = plans_manager.get_label_manager(dataset)
    inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset)
    if inputs != 1:
        raise ModelError(f"{folder / DATASET_JSON}: {inputs} input channels; only 1 is supported")
    networks: list[nn.Module] = []
    mirror_axes: tuple[int, ...] = ()
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise ModelError(f"nnU-Net folder incomplete: {path} not found")
        state = load_checkpoint(path)
        network = _build_network(
            configuration_manager, inputs, label_manager.num_segmentation_heads, folder / PLANS_JSON
        )
        try:
            network.load_state_dict(state["network_weights"])
        except (RuntimeError, TypeError) as exc:
            raise ModelError(f"{path}: weights do not fit the plans' network: {exc}") from exc
        # The same layers and weights, run with a fraction of the peak memory on the CPU.
        networks.append(LeanUNet(network.to(device or torch.device("cpu")).eval()))
        allowed = state.get("inference_allowed_mirroring_axes")
        if mirroring and allowed:
            mirror_axes = tuple(int(a) for a in allowed)
    logger.info(
        "loaded nnU-Net folder %s configuration %s folds %s",
        folder.name,
        configuration,
        ",".join(str(f) for f in folds),
    )
    return NnunetModel(
        tuple(networks),
        plans_manager,
        configuration_manager,
        dataset,
        tile_step_size=tile_step_size,
        mirror_axes=mirror_axes,
        orientation=orientation,
    )
