"""MONAI bundles (the MONAI Model Zoo's format), read as data and run in the volume runtime.

A bundle folder holds ``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``)
and ``models/model.ts`` or ``models/model.pt``. MONAI runs a bundle by evaluating its
config: ``$`` strings are Python expressions and ``_target_`` names any callable, so a
config is code. The node reads it as data instead, and only these keys:

* ``network_def``: a ``_target_`` from :data:`NETWORKS` (``monai.networks.nets``), its
  arguments literals (``@`` references to literals are followed); only read when the
  weights are ``models/model.pt`` (``models/model.ts`` is preferred: TorchScript needs no
  network definition);
* ``preprocessing``: a ``Compose`` of transforms from :data:`TRANSFORMS` (orientation,
  spacing, intensity) and :data:`PASS_THROUGH` (loading and typing, which the node does
  itself), their arguments literals;
* ``inferer``: ``SlidingWindowInferer`` (roi size, overlap, blending) or ``SimpleInferer``;
* the output channels' names from ``metadata.json``'s ``network_data_format``, coded with
  :func:`~scp_node.inference.formats.codes.structure_codes` (the card's ``[[labels]]`` win).

No ``$`` expression is evaluated: a device (:data:`KNOWN_EXPRESSIONS`) is recognised by
its text and replaced by the node's device; anything else in a key the node reads is
refused with a :class:`~scp_node.errors.ModelError` that names the file and the key. Keys
the node does not read (datasets, evaluators, handlers, post-processing) are never looked
at. The bundle's device is ignored (Zoo bundles may hard-code ``cuda``): the node's
``device`` setting decides. Post-processing is softmax and argmax; the probabilities go
back to the source grid through the inverse of ``Spacingd``'s grid, as ``Invertd`` does.
Weights load with ``torch.load(weights_only=True)`` or ``torch.jit.load``.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.formats.codes import label_colour, structure_codes
from scp_node.inference.runtime.volume import Prepared

__all__ = [
    "KNOWN_EXPRESSIONS",
    "NETWORKS",
    "PASS_THROUGH",
    "TRANSFORMS",
    "BundleModel",
    "BundlePlan",
    "complete_card",
    "load_bundle",
    "read_bundle",
]

logger = logging.getLogger(__name__)

METADATA = Path("configs") / "metadata.json"
CONFIGS = tuple(Path("configs") / f"inference.{ext}" for ext in ("json", "yaml", "yml"))
TORCHSCRIPT = Path("models") / "model.ts"
STATE_DICT = Path("models") / "model.pt"

#: ``monai.networks.nets`` classes a ``network_def`` may name.
NETWORKS = frozenset(
    {
        "AttentionUnet",
        "BasicUNet",
        "DynUNet",
        "SegResNet",
        "SegResNetDS",
        "SwinUNETR",
        "UNETR",
        "UNet",
        "VNet",
    }
)

#: Preprocessing transforms -> (``monai.transforms`` array transform, arguments passed on).
TRANSFORMS: dict[str, tuple[str, frozenset[str]]] = {
    "Orientationd": ("Orientation", frozenset({"axcodes", "as_closest_canonical"})),
    "Spacingd": ("Spacing", frozenset({"pixdim", "mode", "padding_mode", "align_corners"})),
    "ScaleIntensityRanged": (
        "ScaleIntensityRange",
        frozenset({"a_min", "a_max", "b_min", "b_max", "clip"}),
    ),
    "NormalizeIntensityd": (
        "NormalizeIntensity",
        frozenset({"subtrahend", "divisor", "nonzero", "channel_wise"}),
    ),
    "ScaleIntensityd": ("ScaleIntensity", frozenset({"minv", "maxv", "factor", "channel_wise"})),
    "ScaleIntensityRangePercentilesd": (
        "ScaleIntensityRangePercentiles",
        frozenset({"lower", "upper", "b_min", "b_max", "clip", "relative", "channel_wise"}),
    ),
}

#: Transforms whose work the node does itself (reading, channel-first, tensor type):
#: skipped, their arguments never read.
PASS_THROUGH = frozenset(
    {
        "LoadImage",
        "LoadImaged",
        "EnsureChannelFirst",
        "EnsureChannelFirstd",
        "EnsureType",
        "EnsureTyped",
        "ToTensor",
        "ToTensord",
        "ToDevice",
        "ToDeviced",
    }
)

#: Arguments of a dictionary transform that name data keys or output types, not the
#: operation: not read (the node computes in float32 on its one image).
_IGNORED_ARGS = frozenset({"keys", "allow_missing_keys", "dtype", "meta_keys", "meta_key_postfix"})

#: ``SlidingWindowInferer`` arguments passed to ``sliding_window_inference``; the node
#: chooses the devices and the batch, so those arguments are not read.
_INFERER_ARGS = frozenset({"roi_size", "overlap", "mode", "sigma_scale", "padding_mode", "cval"})
_INFERER_IGNORED = frozenset(
    {"sw_batch_size", "sw_device", "device", "progress", "cpu_thresh", "cache_roi_weight_map"}
)

_DEVICE = re.compile(
    r"""^\$torch\.device\((['"])(cuda(:\d+)?|cpu)\1"""
    r"""( if torch\.cuda\.is_available\(\) else (['"])(cuda(:\d+)?|cpu)\5)?\)$"""
)
#: What a ``$`` string may say in a key the node reads (recognised, never evaluated): a
#: device, which the node's own device setting replaces. The ``network`` key
#: (``$@network_def.to(@device)`` in Zoo bundles) is not read: the node builds
#: ``network_def`` itself and puts it on its device.
KNOWN_EXPRESSIONS = (
    "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "$torch.device('cuda')",
    "$torch.device('cpu')",
)

_RESERVED = frozenset({"_target_", "_desc_", "_requires_", "_disabled_", "_mode_"})


class _Device:
    """A recognised device expression: the node's device setting stands in for it."""


DEVICE = _Device()


@dataclass(frozen=True)
class _Step:
    """One preprocessing transform: a ``monai.transforms`` array class and its arguments."""

    name: str
    key: str
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class BundlePlan:
    """What the node read from a bundle (all literals; nothing instantiated yet).

    Attributes
    ----------
    orientation
        ``Orientationd`` axcodes: where the network's first, second and third spatial axis
        point (the runtime's x, y, z).
    steps
        Spacing and intensity transforms in config order.
    roi_size
        Sliding window in network axis order; ``None`` for ``SimpleInferer``.
    inferer
        Other ``sliding_window_inference`` arguments (overlap, mode, ...).
    network
        ``monai.networks.nets`` class name and arguments, or ``None`` when the weights are
        TorchScript.
    weights
        ``models/model.ts`` or ``models/model.pt``.
    channels
        Output channel -> name (channel 0 is background), from ``metadata.json``.
    """

    folder: Path
    config: Path
    orientation: str
    steps: tuple[_Step, ...]
    roi_size: tuple[int, ...] | None
    inferer: dict[str, Any]
    network: tuple[str, dict[str, Any]] | None
    weights: Path
    channels: dict[int, str]
    version: str
    description: str
    modality: str


# --- reading the config as data ----------------------------------------------------------


def _load_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ValueError as exc:  # json.JSONDecodeError and yaml.YAMLError's parents
        raise ModelError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError is not a ValueError
        raise ModelError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a mapping at the top level")
    return data


class _Config:
    """A parsed config, its ``@`` references followed, ``$`` and ``%`` refused."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    def error(self, key: str, why: str) -> ModelError:
        return ModelError(f"{self.path}: {key}: {why}")

    def lookup(self, reference: str, key: str) -> tuple[str, Any]:
        """The raw value of config id ``reference`` (``a::b::0``; ``#`` also separates)."""
        node: Any = self.data
        for part in reference.replace("#", "::").split("::"):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise self.error(key, f"reference @{reference} names no key of the config")
        return reference, node

    def literal(self, value: Any, key: str, seen: frozenset[str] = frozenset()) -> Any:
        """``value`` as plain data: references followed; expressions, macros and nested
        ``_target_`` refused (the message names ``key``)."""
        if isinstance(value, str):
            if value.startswith("@"):
                reference = value[1:]
                if reference in seen:
                    raise self.error(key, f"reference cycle through @{reference}")
                name, raw = self.lookup(reference, key)
                return self.literal(raw, name, seen | {reference})
            if value.startswith("$"):
                if _DEVICE.match(value):
                    return DEVICE
                raise self.error(
                    key,
                    f"expression {value!r} refused: a bundle config is read as data and no "
                    "expression is evaluated except a device",
                )
            if value.startswith("%"):
                raise self.error(key, f"macro {value!r} refused: macros are not read")
            return value
        if isinstance(value, list):
            return [self.literal(v, f"{key}::{i}", seen) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if "_target_" in value:
                raise self.error(
                    f"{key}::_target_",
                    f"{value['_target_']!r} refused: no object is built inside an argument",
                )
            return {str(k): self.literal(v, f"{key}::{k}", seen) for k, v in value.items()}
        if value is None or isinstance(value, bool | int | float):
            return value
        raise self.error(key, f"value of type {type(value).__name__} is not plain data")

    def component(self, reference: str) -> tuple[str, dict[str, Any]]:
        """The dict at ``reference`` (following a top-level ``@`` alias), and its id."""
        if reference not in self.data:
            raise self.error(reference, "missing")
        key, value = reference, self.data[reference]
        seen: set[str] = set()
        while isinstance(value, str) and value.startswith("@") and value[1:] not in seen:
            seen.add(value[1:])
            key, value = self.lookup(value[1:], key)
        if isinstance(value, str) and value.startswith("$"):
            raise self.error(
                key,
                f"expression {value!r} refused: the node reads {reference} as data "
                "(a dict with _target_), it evaluates no expression",
            )
        if not isinstance(value, dict):
            raise self.error(key, "not a mapping with _target_")
        return key, value

    def arguments(
        self, value: dict[str, Any], key: str, allowed: frozenset[str], ignored: frozenset[str]
    ) -> dict[str, Any]:
        """The literal arguments of a component; unknown arguments refused."""
        mode = value.get("_mode_", "default")
        if mode != "default":
            raise self.error(f"{key}::_mode_", f"{mode!r} refused: only 'default' is read")
        out: dict[str, Any] = {}
        for name, raw in value.items():
            if name in _RESERVED or name in ignored:
                continue
            if name not in allowed:
                raise self.error(
                    f"{key}::{name}",
                    f"argument not understood by the node (it reads {', '.join(sorted(allowed))})",
                )
            out[name] = self.literal(raw, f"{key}::{name}")
            if _has_device(out[name]):
                raise self.error(f"{key}::{name}", "a device is not an argument the node passes")
        return out


def _has_device(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_device(v) for v in value)
    if isinstance(value, dict):
        return any(_has_device(v) for v in value.values())
    return value is DEVICE


def _class_name(target: Any, module: str) -> str | None:
    """``UNet`` for ``UNet`` or ``<module>.UNet``; ``None`` for anything else."""
    if not isinstance(target, str):
        return None
    if target.startswith(f"{module}."):
        target = target[len(module) + 1 :]
    return target if target.isidentifier() else None


def _target(config: _Config, value: dict[str, Any], key: str, module: str) -> str:
    target = value.get("_target_")
    if target is None:
        raise config.error(f"{key}::_target_", "missing")
    name = _class_name(target, module)
    if name is None:
        raise config.error(f"{key}::_target_", f"{target!r} refused: not a {module} class")
    return name


def _disabled(config: _Config, value: dict[str, Any], key: str) -> bool:
    flag = value.get("_disabled_", False)
    if not isinstance(flag, bool):
        raise config.error(f"{key}::_disabled_", f"{flag!r} refused: only true/false is read")
    return flag


def _network(config: _Config) -> tuple[str, dict[str, Any]]:
    key, value = config.component("network_def")
    name = _target(config, value, key, "monai.networks.nets")
    if name not in NETWORKS:
        raise config.error(
            f"{key}::_target_",
            f"{value['_target_']!r} refused: not an allowed network "
            f"({', '.join(sorted(NETWORKS))})",
        )
    mode = value.get("_mode_", "default")
    if mode != "default":
        raise config.error(f"{key}::_mode_", f"{mode!r} refused: only 'default' is read")
    arguments: dict[str, Any] = {}
    for arg, raw in value.items():
        if arg in _RESERVED:
            continue
        literal = config.literal(raw, f"{key}::{arg}")
        if _has_device(literal):
            raise config.error(f"{key}::{arg}", "a device is not a network argument")
        arguments[arg] = literal
    return name, arguments


def _preprocessing(config: _Config, fallback: str | None) -> tuple[str, tuple[_Step, ...]]:
    key, value = config.component("preprocessing")
    name = _target(config, value, key, "monai.transforms")
    if name != "Compose":
        raise config.error(f"{key}::_target_", f"{value['_target_']!r} refused: expected Compose")
    raw = value.get("transforms")
    transforms_key = f"{key}::transforms"
    if isinstance(raw, str) and raw.startswith("@"):
        transforms_key, raw = config.lookup(raw[1:], transforms_key)
    if isinstance(raw, str):
        raise config.error(
            transforms_key,
            f"{raw!r} refused: the transforms must be a list (no expression is evaluated)",
        )
    if not isinstance(raw, list):
        raise config.error(transforms_key, "not a list of transforms")
    orientation: str | None = None
    steps: list[_Step] = []
    for index, item in enumerate(raw):
        item_key = f"{transforms_key}::{index}"
        if isinstance(item, str) and item.startswith("@"):
            item_key, item = config.lookup(item[1:], item_key)
        if not isinstance(item, dict):
            raise config.error(item_key, "not a transform (a mapping with _target_)")
        transform = _target(config, item, item_key, "monai.transforms")
        if _disabled(config, item, item_key) or transform in PASS_THROUGH:
            continue
        if transform not in TRANSFORMS:
            known = ", ".join(sorted({*TRANSFORMS, *PASS_THROUGH}))
            raise config.error(
                f"{item_key}::_target_",
                f"{item['_target_']!r} refused: not an allowed transform ({known})",
            )
        array_name, allowed = TRANSFORMS[transform]
        kwargs = config.arguments(item, item_key, allowed, _IGNORED_ARGS)
        if transform == "Orientationd":
            if steps:
                raise config.error(
                    item_key, "Orientationd after other spatial or intensity transforms"
                )
            if orientation is not None:
                raise config.error(item_key, "a second Orientationd")
            orientation = "RAS" if kwargs.get("as_closest_canonical") else kwargs.get("axcodes")
            if not isinstance(orientation, str) or len(orientation) != 3:
                raise config.error(f"{item_key}::axcodes", f"{orientation!r}: expected 3 letters")
            continue
        steps.append(_Step(array_name, item_key, kwargs))
    if orientation is None:
        if fallback is None:
            raise config.error(
                transforms_key,
                "no Orientationd: set [bundle] orientation in model.toml to the axes the "
                "network was trained in (e.g. 'RAS')",
            )
        orientation = fallback
    return orientation.upper(), tuple(steps)


def _inferer(config: _Config) -> tuple[tuple[int, ...] | None, dict[str, Any]]:
    key, value = config.component("inferer")
    name = _target(config, value, key, "monai.inferers")
    if name == "SimpleInferer":
        config.arguments(value, key, frozenset(), frozenset())
        return None, {}
    if name != "SlidingWindowInferer":
        raise config.error(
            f"{key}::_target_",
            f"{value['_target_']!r} refused: not an allowed inferer "
            "(SlidingWindowInferer, SimpleInferer)",
        )
    kwargs = config.arguments(value, key, _INFERER_ARGS, _INFERER_IGNORED)
    roi = kwargs.pop("roi_size", None)
    if not isinstance(roi, list) or not all(isinstance(v, int) and v > 0 for v in roi):
        raise config.error(f"{key}::roi_size", f"{roi!r}: expected a list of positive integers")
    return tuple(roi), kwargs


def _metadata(folder: Path) -> tuple[dict[str, Any], dict[int, str], str]:
    path = folder / METADATA
    if not path.is_file():
        raise ModelError(f"MONAI bundle incomplete: {path} not found")
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelError(f"{path}: not a JSON object")
    data_format = metadata.get("network_data_format") or {}
    outputs = data_format.get("outputs") if isinstance(data_format, dict) else None
    if not isinstance(outputs, dict) or not outputs:
        raise ModelError(f"{path}: network_data_format.outputs missing")
    output_key = "pred" if "pred" in outputs else next(iter(outputs))
    output = outputs[output_key]
    where = f"network_data_format.outputs.{output_key}"
    definition = output.get("channel_def") if isinstance(output, dict) else None
    channels: dict[int, str] = {}
    if isinstance(definition, dict):
        for index, name in definition.items():
            if not str(index).isdigit():
                raise ModelError(f"{path}: {where}.channel_def.{index}: not a channel number")
            channels[int(index)] = str(name)
    count = output.get("num_channels") if isinstance(output, dict) else None
    if isinstance(count, int) and count > 0:
        channels = {c: channels.get(c, f"channel {c}") for c in range(count)}
    if len(channels) < 2 or sorted(channels) != list(range(len(channels))):
        raise ModelError(
            f"{path}: {where}: channel_def / num_channels must number the output channels "
            "0 (background) to N"
        )
    inputs = data_format.get("inputs") or {}
    first: Any = next(iter(inputs.values()), {}) if isinstance(inputs, dict) else {}
    modality = str(first.get("modality", "CT")) if isinstance(first, dict) else "CT"
    return metadata, channels, "CT" if modality.upper() == "CT" else "MR"


def _config_path(folder: Path, name: str | None) -> Path:
    if name is not None:
        path = folder / name
        if not path.is_file():
            raise ModelError(f"MONAI bundle incomplete: {path} not found")
        return path
    for candidate in CONFIGS:
        if (folder / candidate).is_file():
            return folder / candidate
    raise ModelError(f"MONAI bundle incomplete: no {CONFIGS[0]} (or .yaml) in {folder}")


def read_bundle(
    folder: Path, config: str | None = None, orientation: str | None = None
) -> BundlePlan:
    """Read a bundle's network, preprocessing, inferer and labels as data.

    Parameters
    ----------
    folder
        The bundle root (``configs/``, ``models/``).
    config
        Inference config relative to ``folder``; default ``configs/inference.json``
        (``.yaml``, ``.yml``).
    orientation
        Axes of the network when the preprocessing has no ``Orientationd``.

    Returns
    -------
    BundlePlan

    Raises
    ------
    ModelError
        A file is missing or unreadable; a key the node reads holds an expression, a macro,
        a ``_target_`` off the allow-lists or an argument it does not understand (the
        message names the file and the key).
    """
    if not folder.is_dir():
        raise ModelError(f"MONAI bundle folder {folder} is not a directory")
    metadata, channels, modality = _metadata(folder)
    path = _config_path(folder, config)
    parsed = _Config(path, _load_config(path))
    axes, steps = _preprocessing(parsed, orientation)
    roi, inferer = _inferer(parsed)
    if (folder / TORCHSCRIPT).is_file():
        weights, network = folder / TORCHSCRIPT, None
    elif (folder / STATE_DICT).is_file():
        weights, network = folder / STATE_DICT, _network(parsed)
    else:
        raise ModelError(f"MONAI bundle incomplete: no {TORCHSCRIPT} or {STATE_DICT} in {folder}")
    return BundlePlan(
        folder=folder,
        config=path,
        orientation=axes,
        steps=steps,
        roi_size=roi,
        inferer=inferer,
        network=network,
        weights=weights,
        channels=channels,
        version=str(metadata.get("version", "1"))[:16],
        description=str(metadata.get("name", ""))[:200],
        modality=modality,
    )


# --- the card ------------------------------------------------------------------------------


def _bundle_folder(card: Path, raw: Mapping[str, Any]) -> Path:
    table = raw.get("bundle") or {}
    folder = Path(str(table.get("folder", ".")))
    return folder if folder.is_absolute() else card.parent / folder


def complete_card(card: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """Fill a ``format = "monai_bundle"`` card's tables from its bundle.

    The card may be as small as ``format = "monai_bundle"`` (the bundle beside it, or
    ``[bundle] folder``): the name defaults to the model directory's, the version to the
    bundle's, the labels come from ``metadata.json``'s output ``channel_def`` coded with
    :func:`structure_codes` (a card's own ``[[labels]]`` win; their values are output
    channels), the modality from its input.

    Raises
    ------
    ModelError
        As :func:`read_bundle`; or a channel has no known code and the card gives no
        ``[[labels]]``, or a card label names no output channel.
    """
    raw = dict(raw)
    table = dict(raw.get("bundle") or {})
    folder = _bundle_folder(card, raw)
    plan = read_bundle(folder, table.get("config"), table.get("orientation"))
    raw.setdefault("name", card.parent.name)
    raw.setdefault("version", plan.version)
    if plan.description:
        raw.setdefault("description", plan.description)
    raw["kind"] = "volume"
    raw["bundle"] = table
    raw["weights"] = {"format": "monai_bundle", "file": str(table.get("folder", "."))}
    preview = {} if plan.modality == "CT" else {"window_center": None, "window_width": None}
    raw.setdefault("input", {"modality": plan.modality, **preview})
    raw.setdefault("series", {"modalities": [plan.modality]})
    if "labels" not in raw:
        raw["labels"] = _coded_labels(plan, card)
    else:
        for label in raw["labels"]:
            value = label.get("value") if isinstance(label, dict) else None
            if isinstance(value, int) and value not in plan.channels:
                raise ModelError(
                    f"{card}: labels: value {value} is not an output channel of the bundle "
                    f"(channels 1 to {max(plan.channels)})"
                )
    return raw


def _coded_labels(plan: BundlePlan, card: Path) -> list[dict[str, Any]]:
    labels: list[dict[str, Any]] = []
    for channel, name in sorted(plan.channels.items()):
        if channel == 0:
            continue
        codes = structure_codes(name) or structure_codes(name.strip().lower().replace(" ", "_"))
        if codes is None or "category" not in codes or "type" not in codes:
            raise ModelError(
                f"{plan.folder / METADATA}: network_data_format.outputs channel_def.{channel} "
                f"({name!r}): no SNOMED CT code known for this structure; give the codes as "
                f"[[labels]] in {card}"
            )
        labels.append(
            {"value": channel, "name": name, "color": label_colour(channel, name), **codes}
        )
    return labels


# --- running -------------------------------------------------------------------------------


class BundleModel:
    """A bundle's network with its preprocessing and inferer, for the volume runtime.

    Built by :func:`load_bundle`. Attributes follow
    :class:`~scp_node.inference.runtime.volume.VolumeModel`; :meth:`sliding_window` makes
    it a :class:`~scp_node.inference.runtime.volume.WindowedModel` (MONAI's
    ``sliding_window_inference`` with the bundle's settings).
    """

    def __init__(self, network: nn.Module, plan: BundlePlan, class_values: tuple[int, ...]):
        import monai.transforms

        self.networks: tuple[nn.Module, ...] = (network,)
        self._plan = plan
        roi = plan.roi_size or (0, 0, 0)
        self.patch_size: tuple[int, int, int] = (roi[0], roi[1], roi[2])
        overlap = plan.inferer.get("overlap", 0.25)
        self.tile_step_size = 1.0 - float(overlap if isinstance(overlap, int | float) else 0.25)
        self.mirror_axes: tuple[int, ...] = ()
        self.class_values = class_values
        self.orientation = plan.orientation
        self._steps: list[Callable[[Any], Any]] = []
        for step in plan.steps:
            cls = getattr(monai.transforms, step.name)
            try:
                self._steps.append(cls(**step.kwargs))
            except (TypeError, ValueError) as exc:
                raise ModelError(f"{plan.config}: {step.key}: {exc}") from exc

    def prepare(
        self, volume: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]
    ) -> Prepared:
        """The bundle's transforms on a (z, y, x) volume already in its orientation.

        The network's axes are MONAI's (x, y, z): the volume is transposed, and the
        transforms run on a ``MetaTensor`` whose affine is its voxel spacing, so
        ``Spacing`` lays its grid out exactly as in the bundle's own run (first voxel
        centres on one point), which :attr:`Prepared.scale` tells the runtime.
        """
        from monai.data.meta_tensor import MetaTensor

        spacing = np.array(spacing_zyx[::-1], dtype=np.float64)
        affine = torch.from_numpy(np.diag([*spacing, 1.0]))
        data: Any = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32))[
                None
            ],
            affine=affine,
        )
        with torch.inference_mode():
            for step in self._steps:
                data = step(data)
        if isinstance(data, MetaTensor):
            out_spacing = np.asarray(data.pixdim, dtype=np.float64)[:3]
            array = data.as_tensor()
        else:
            out_spacing, array = spacing, torch.as_tensor(data)
        shape = (int(volume.shape[2]), int(volume.shape[1]), int(volume.shape[0]))
        scale = tuple(float(s) for s in spacing / out_spacing)
        full = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        return Prepared(
            data=np.ascontiguousarray(array.float().numpy()),
            crop_shape=shape,
            bbox=full,
            full_shape=shape,
            transpose_backward=(2, 1, 0),
            scale=(scale[0], scale[1], scale[2]),
        )

    def sliding_window(
        self, data: npt.NDArray[np.float32], device: torch.device, batch_size: int
    ) -> torch.Tensor:
        """Class probabilities (classes, *spatial) on the CPU: the bundle's inferer on the
        node's device, then a softmax over the channels.

        Zoo bundles post-process with ``Activationsd(softmax=True)`` before ``Invertd``:
        resampling probabilities rather than logits back to the source grid is what makes
        the labels agree with the bundle's own run at organ boundaries.

        Raises
        ------
        ModelError
            The network gives another number of channels than the bundle's metadata names.
        """
        from monai.inferers.utils import sliding_window_inference

        network = self.networks[0]
        inputs = torch.from_numpy(data)[None]
        with torch.inference_mode():
            if self._plan.roi_size is None:
                out: Any = network(inputs.to(device))
            else:
                out = sliding_window_inference(
                    inputs,
                    self._plan.roi_size,
                    batch_size,
                    network,
                    sw_device=device,
                    device=torch.device("cpu"),
                    **self._plan.inferer,
                )
        if isinstance(out, list | tuple):
            out = out[0]
        logits = torch.as_tensor(out).float().cpu()[0]
        if logits.shape[0] != len(self.class_values):
            raise ModelError(
                f"{self._plan.weights}: the network gives {logits.shape[0]} channels, "
                f"{self._plan.folder / METADATA} names {len(self.class_values)}"
            )
        return torch.softmax(logits, dim=0)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next(
            (line.strip() for line in str(exc).splitlines() if "GLOBAL" in line),
            str(exc).splitlines()[0] if str(exc) else "",
        )
        raise ModelError(
            f"{path}: refused: the weights need arbitrary pickle to load, which could run "
            f"code ({detail}); only tensors are accepted"
        ) from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise ModelError(f"{path}: cannot read weights: {exc}") from exc
    if isinstance(loaded, dict) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        # A CheckpointSaver file: {"model": state_dict, ...}.
        nested = [v for k, v in loaded.items() if k in ("model", "network", "state_dict")]
        loaded = nested[0] if len(nested) == 1 else None
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ModelError(f"{path}: not a state dict (nor one under 'model' or 'network')")
    return loaded


def _build(plan: BundlePlan) -> nn.Module:
    import monai.networks.nets as nets

    assert plan.network is not None
    name, arguments = plan.network
    try:
        network: nn.Module = getattr(nets, name)(**arguments)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ModelError(f"{plan.config}: network_def: cannot build {name}: {exc}") from exc
    try:
        network.load_state_dict(_state_dict(plan.weights))
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"{plan.weights}: weights do not fit network_def: {exc}") from exc
    return network


def load_bundle(
    folder: Path,
    labels: Collection[int],
    *,
    config: str | None = None,
    orientation: str | None = None,
    device: torch.device | None = None,
) -> BundleModel:
    """Load a bundle's weights for the volume runtime.

    Parameters
    ----------
    folder
        The bundle root.
    labels
        The output channels the card labels; the others count as background.
    config, orientation
        As :func:`read_bundle`.
    device
        Where the network runs (CPU by default); the bundle's own device is ignored.

    Raises
    ------
    ModelError
        As :func:`read_bundle`; the weights cannot be read, need arbitrary pickle, or do
        not fit the network.
    """
    device = device or torch.device("cpu")
    plan = read_bundle(folder, config, orientation)
    if plan.network is None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated")
                network: nn.Module = torch.jit.load(str(plan.weights), map_location=device)  # type: ignore[no-untyped-call]
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelError(f"{plan.weights}: cannot load TorchScript: {exc}") from exc
    else:
        network = _build(plan)
    logger.info("loaded MONAI bundle %s (%s)", folder.name, plan.weights.name)
    class_values = tuple(c if c in labels else 0 for c in sorted(plan.channels))
    return BundleModel(network.to(device).eval(), plan, class_values)
