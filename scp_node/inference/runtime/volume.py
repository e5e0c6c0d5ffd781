"""The volume runtime: a 3-D network by sliding window, labels on the source grid.

Path of one volume (``VolumePredictor.predict``): reorient the source array to the model's
orientation (an axis permutation and flips from the source's direction cosines, see
:mod:`~scp_node.inference.runtime.geometry`), the format's ``prepare`` (transpose, crop,
normalise, resample to the network's spacing), Gaussian-blended sliding windows
(:func:`~scp_node.inference.runtime.window.sliding_window_logits`, or the format's own
inferer), logits resampled back onto the cropped source grid in slabs and per-class chunks
with a running argmax (memory bounded whatever the study's length and the number of
classes) straight into the crop box of the label map (seen through the transpose and the
reorientation, so no second label-sized array), class indices mapped to the card's label
values in place. The source is handed to the format in its own dtype (int16 for CT); no
float32 copy of it is made here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.device import torch_device
from scp_node.inference.runtime.geometry import AXIAL, reorientation
from scp_node.inference.runtime.window import sliding_window_logits

__all__ = [
    "STAGES",
    "Prepared",
    "VolumeModel",
    "VolumePredictor",
    "WindowedModel",
    "orientation_flips",
    "release_freed_memory",
    "resample_argmax",
]

logger = logging.getLogger(__name__)

#: The stages :attr:`VolumePredictor.stage_s` times.
STAGES = ("prepare", "network", "resample_out", "labels")

#: Largest float32 working set (bytes) of one resampling chunk.
_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Prepared:
    """A volume prepared for the network, and how to put its result back.

    Attributes
    ----------
    data
        (channels, z, y, x) float32 at the network's spacing, in network axis order.
    crop_shape
        Shape of the grid the logits are resampled back onto (network axis order).
    bbox
        Where that grid lies inside ``full_shape``.
    full_shape
        The whole (transposed) source grid.
    transpose_backward
        Axis permutation from network order back to (z, y, x).
    nearest_axis
        Axis resampled by nearest neighbour (nnU-Net's "separate z" for anisotropic
        spacing), or ``None`` for trilinear along all three.
    scale
        Logits voxels per ``crop_shape`` voxel along each axis with the first voxel centres
        of both grids on one point (MONAI's ``Spacing``); ``None``: both grids span the same
        extent, voxel edges on edges (nnU-Net's and skimage's resize).
    """

    data: npt.NDArray[np.float32]
    crop_shape: tuple[int, int, int]
    bbox: tuple[slice, slice, slice]
    full_shape: tuple[int, int, int]
    transpose_backward: tuple[int, int, int] = (0, 1, 2)
    nearest_axis: int | None = None
    scale: tuple[float, float, float] | None = None


class VolumeModel(Protocol):
    """What a format hands to the volume runtime."""

    networks: tuple[nn.Module, ...]
    patch_size: tuple[int, int, int]
    tile_step_size: float
    mirror_axes: tuple[int, ...]
    #: Label value of each output channel (channel 0: background, value 0).
    class_values: tuple[int, ...]
    #: Where the network's x, y, z axes point: ``LPS`` (DICOM pixel order of an axial
    #: series), ``RAS``, ... (see :func:`~scp_node.inference.runtime.geometry.reorientation`).
    orientation: str

    def prepare(
        self, volume: npt.NDArray[Any], spacing_zyx: tuple[float, float, float]
    ) -> Prepared:
        """``volume``: (z, y, x) in the model's orientation, modality units, the source's
        dtype (often int16), possibly a non-contiguous view; never modified."""
        ...


@runtime_checkable
class WindowedModel(Protocol):
    """A :class:`VolumeModel` that runs its own sliding window (a MONAI bundle's inferer)."""

    def sliding_window(
        self, data: npt.NDArray[np.float32], device: torch.device, batch_size: int
    ) -> torch.Tensor:
        """(classes, z, y, x) class scores (logits or probabilities) of ``Prepared.data``, on
        the CPU; the runtime resamples them back and takes the argmax."""
        ...


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``).

    glibc keeps the memory of freed tensors under its mmap threshold (which grows up to
    32 MiB as large blocks are freed) for reuse: after the sliding window's many slab-sized
    temporaries, the resident set stays hundreds of MiB above what is live, and the next
    stage adds its own peak on top. A no-op where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)


def orientation_flips(orientation: str) -> tuple[int, ...]:
    """Axes of a DICOM-order axial (z, y, x) array to flip for ``orientation``.

    The shorthand of :func:`~scp_node.inference.runtime.geometry.reorientation` for an
    axial source: x towards patient Left, y towards Posterior, z towards Superior (LPS).
    ``RAS`` (NIfTI-trained models read by SimpleITK: x towards Right, y towards Anterior)
    flips y and x.

    Raises
    ------
    ValueError
        Not an orientation code, or one that needs more than flips (an axis permutation).
    """
    turn = reorientation(AXIAL, orientation)
    if turn.permutation != (0, 1, 2):
        raise ValueError(f"orientation {orientation!r} permutes an axial volume's axes")
    return turn.flips


def _interpolation_matrix(
    n_out: int, n_in: int, nearest: bool, scale: float | None = None
) -> torch.Tensor:
    """(n_out, n_in) float32 weights of linear interpolation along one axis.

    Output voxel ``i`` sits at input coordinate ``(i + 0.5) * n_in / n_out - 0.5`` (cell
    centres, both grids over the same extent: ``scale`` ``None``) or ``i * scale`` (first
    centres on one point), clamped to the input (edge mode); ``nearest`` rounds it. Each row
    has at most two non-zero weights, summing to 1.
    """
    index = torch.arange(n_out, dtype=torch.float64)
    centres = (index + 0.5) * (n_in / n_out) - 0.5 if scale is None else index * scale
    centres = torch.clamp(centres, 0, n_in - 1)
    if nearest:
        centres = torch.round(centres)
    low = torch.floor(centres).long()
    high = torch.clamp(low + 1, max=n_in - 1)
    weight = centres - low
    matrix = torch.zeros((n_out, n_in), dtype=torch.float64)
    matrix.index_put_((index.long(), low), 1 - weight, accumulate=True)
    matrix.index_put_((index.long(), high), weight, accumulate=True)
    return matrix.float()


def _keep_larger(
    candidates: torch.Tensor, first: int, best: torch.Tensor, index: torch.Tensor
) -> None:
    """Fold (classes, ...) ``candidates`` numbered from ``first`` into a running argmax."""
    values, which = torch.max(candidates, dim=0)
    better = values > best  # strict: on a tie the lower class index stays
    torch.where(better, values, best, out=best)
    torch.where(better, which.to(index.dtype) + first, index, out=index)


def resample_argmax(
    logits: torch.Tensor,
    shape: Sequence[int],
    *,
    nearest_axis: int | None = None,
    slab: int = 0,
    scale: Sequence[float] | None = None,
    out: npt.NDArray[np.unsignedinteger] | None = None,
) -> npt.NDArray[np.unsignedinteger]:
    """Class index of the largest logit after resampling ``logits`` to ``shape``.

    Trilinear with cell-centre alignment (as ``skimage.transform.resize`` order 1 with edge
    mode, which nnU-Net uses), nearest along ``nearest_axis``. Linear interpolation is
    separable: z first, at the logits' in-plane size, as a product with a (n_out, n_in)
    weight matrix, then in-plane by ``F.interpolate`` (bilinear, cell centres) or by two
    more such products (nearest or corner-aligned axes); a fraction of the cost of a
    gather per output voxel (``grid_sample``). Done in slabs of output slices and in chunks of
    classes with a running maximum, so memory stays near ``_CHUNK_BYTES``.

    Parameters
    ----------
    logits
        (classes, z, y, x), any float dtype, CPU.
    shape
        Output (z, y, x).
    nearest_axis
        Axis sampled by nearest neighbour, or ``None``.
    slab
        Output slices along axis 0 per step; 0 chooses from the memory budget.
    scale
        Per axis, ``logits`` voxels per output voxel with the first voxel centres of the
        two grids on one point (see :attr:`Prepared.scale`); ``None``: the two grids cover
        the same extent.
    out
        Where to write the indices (``shape``, an unsigned integer dtype wide enough for
        the class count; a view is fine, e.g. the cropped part of the whole label map), so
        no second label-sized array is made; ``None``: a new one.

    Returns
    -------
    numpy.ndarray
        (z, y, x) class indices (ties: the lowest index): ``out``, or uint8 (uint16 from
        257 classes on).

    Raises
    ------
    ValueError
        ``out`` has another shape or too narrow a dtype.
    """
    classes = int(logits.shape[0])
    out_shape = tuple(int(s) for s in shape)
    if out is None:
        out = np.empty(out_shape, dtype=np.uint8 if classes <= 256 else np.uint16)
    elif out.shape != out_shape or not (
        np.issubdtype(out.dtype, np.unsignedinteger) and classes - 1 <= np.iinfo(out.dtype).max
    ):
        raise ValueError(
            f"out must be {out_shape} holding {classes} classes, got {out.shape} {out.dtype}"
        )
    per_slice = out_shape[1] * out_shape[2] * 4
    if tuple(logits.shape[1:]) == out_shape and (scale is None or all(s == 1 for s in scale)):
        best = torch.full(out_shape, -torch.inf)
        index = torch.zeros(out_shape, dtype=torch.int32)
        class_chunk = max(1, min(classes, _CHUNK_BYTES // max(1, per_slice * out_shape[0])))
        for c0 in range(0, classes, class_chunk):
            _keep_larger(logits[c0 : c0 + class_chunk].float(), c0, best, index)
        out[...] = index.numpy()
        return out
    along_z, along_y, along_x = (
        _interpolation_matrix(
            n_out, int(n_in), nearest_axis == axis, None if scale is None else float(scale[axis])
        )
        for axis, (n_out, n_in) in enumerate(zip(out_shape, logits.shape[1:], strict=True))
    )
    across_x = along_x.T.contiguous()
    # Cell-centre alignment in-plane is what F.interpolate computes (align_corners=False).
    in_plane_bilinear = scale is None and nearest_axis not in (1, 2)
    in_y, in_x = int(logits.shape[2]), int(logits.shape[3])
    slab = slab or max(1, min(out_shape[0], _CHUNK_BYTES // (per_slice * 8)))
    class_chunk = max(1, min(classes, _CHUNK_BYTES // max(1, per_slice * slab)))
    for z0 in range(0, out_shape[0], slab):
        rows = along_z[z0 : z0 + slab]
        used = torch.nonzero(rows.any(dim=0)).flatten()
        first, last = int(used[0]), int(used[-1]) + 1
        rows = rows[:, first:last]
        depth = int(rows.shape[0])
        best = torch.full((depth, *out_shape[1:]), -torch.inf)
        index = torch.zeros((depth, *out_shape[1:]), dtype=torch.int32)
        for c0 in range(0, classes, class_chunk):
            chunk = logits[c0 : c0 + class_chunk, first:last].float()
            count = int(chunk.shape[0])
            # z: (depth, used) @ (count, used, y * x) -> (count, depth, y * x)
            planes = torch.matmul(rows, chunk.reshape(count, last - first, in_y * in_x))
            if in_plane_bilinear:
                # The same weights as the matrices, by torch's vectorised kernel.
                planes = F.interpolate(
                    planes.reshape(1, count * depth, in_y, in_x),
                    size=out_shape[1:],
                    mode="bilinear",
                    align_corners=False,
                )
            else:
                # x: one product over every row of every plane; y: per plane.
                planes = torch.matmul(planes.reshape(-1, in_x), across_x)
                planes = torch.matmul(along_y, planes.reshape(count * depth, in_y, out_shape[2]))
            _keep_larger(planes.reshape(count, depth, *out_shape[1:]), c0, best, index)
        out[z0 : z0 + depth] = index.numpy()
    return out


class VolumePredictor:
    """Runs a :class:`VolumeModel` on (slices, rows, columns) volumes.

    Parameters
    ----------
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:<n>"``.
    batch_size
        Windows per forward pass; ``None``: 1 on the CPU (a window's activations at full
        resolution cost hundreds of MB, and batching gains nothing there), 4 on CUDA.
    threads
        When > 0, ``torch.set_num_threads(threads)`` (process-wide).

    Raises
    ------
    ValueError
        Unknown device, CUDA asked for but unavailable, or ``batch_size`` < 1.
    """

    def __init__(
        self, device: str = "auto", batch_size: int | None = None, threads: int = 0
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._device = torch_device(device, threads)
        self.batch_size = batch_size or (4 if self._device.type == "cuda" else 1)
        self._model: VolumeModel | None = None
        self.variant = "fp32"
        #: Seconds spent per stage of :meth:`predict` since construction (``prepare``:
        #: reorientation and the format's preprocessing, resampling in included;
        #: ``network``: sliding window with blending; ``resample_out``: logits back onto
        #: the source grid and argmax; ``labels``: uncrop, orientation undone, label values).
        self.stage_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self._device.type

    @property
    def torch_device(self) -> torch.device:
        return self._device

    @property
    def model(self) -> VolumeModel:
        """The loaded model; raises :class:`ModelError` when none is."""
        if self._model is None:
            raise ModelError("no model loaded: call load_model() first")
        return self._model

    def load_model(self, model: VolumeModel) -> None:
        """Use ``model`` (its networks already on this predictor's device)."""
        self._model = model

    def predict(
        self,
        volume: npt.NDArray[np.floating],
        spacing_zyx: tuple[float, float, float],
        direction: npt.NDArray[np.float64] | None = None,
    ) -> npt.NDArray[np.unsignedinteger]:
        """Segment a volume.

        Parameters
        ----------
        volume
            (slices, rows, columns) in modality units, in the source's stored order.
        spacing_zyx
            Slice distance, row spacing, column spacing in mm.
        direction
            (3, 3): row ``i`` is the patient (LPS) direction array axis ``i`` points along
            (:func:`~scp_node.inference.runtime.geometry.axis_directions` of the source's
            ImageOrientationPatient); ``None``: an axial series in DICOM pixel order.

        Returns
        -------
        numpy.ndarray
            Label map of ``volume``'s shape and order: uint8 (uint16 when a value exceeds
            255), values 0 or the model's label values.

        Raises
        ------
        ModelError
            No model loaded.
        ValueError
            ``volume`` is not 3-D, a spacing is not positive, or ``direction`` is not three
            independent directions.
        """
        model = self.model
        if volume.ndim != 3:
            raise ValueError(f"volume must be (slices, rows, columns), got shape {volume.shape}")
        if min(spacing_zyx) <= 0:
            raise ValueError(f"spacing must be > 0, got {spacing_zyx}")
        started = time.perf_counter()
        turn = reorientation(AXIAL if direction is None else direction, model.orientation)
        # A view in the source's dtype: the format converts (slab by slab where it can).
        oriented = turn.apply(np.asarray(volume))
        prepared = model.prepare(oriented, turn.spacing(spacing_zyx))
        release_freed_memory()
        prepared_at = time.perf_counter()
        if isinstance(model, WindowedModel):
            logits = model.sliding_window(prepared.data, self._device, self.batch_size)
        else:
            logits = sliding_window_logits(
                prepared.data,
                model.networks,
                model.patch_size,
                len(model.class_values),
                step=model.tile_step_size,
                batch_size=self.batch_size,
                mirror_axes=model.mirror_axes,
                device=self._device,
            )
        release_freed_memory()
        ran = time.perf_counter()
        # One label-sized array: the indices go straight into the crop box of the label
        # map, seen in the network's axis order, and become label values there.
        wide = max(model.class_values) > 255 or len(model.class_values) > 256
        labels: npt.NDArray[np.unsignedinteger] = np.zeros(
            volume.shape, dtype=np.uint16 if wide else np.uint8
        )
        forward = tuple(int(a) for a in np.argsort(prepared.transpose_backward))
        box = turn.apply(labels).transpose(forward)[prepared.bbox]
        resample_argmax(
            logits,
            prepared.crop_shape,
            nearest_axis=prepared.nearest_axis,
            scale=prepared.scale,
            out=box,
        )
        del logits, prepared
        resampled = time.perf_counter()
        if model.class_values != tuple(range(len(model.class_values))):
            lut = np.asarray(model.class_values, dtype=labels.dtype)
            for z0 in range(0, box.shape[0], 64):
                box[z0 : z0 + 64] = lut[box[z0 : z0 + 64]]
        stage = self.stage_s
        stage["prepare"] += prepared_at - started
        stage["network"] += ran - prepared_at
        stage["resample_out"] += resampled - ran
        stage["labels"] += time.perf_counter() - resampled
        logger.info(
            "predicted volume of %d slices %dx%d in %.2f s (%s)",
            volume.shape[0],
            volume.shape[1],
            volume.shape[2],
            time.perf_counter() - started,
            self.device,
        )
        return labels
