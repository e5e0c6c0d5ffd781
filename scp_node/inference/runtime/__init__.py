"""Runtimes: how a model card's network is applied to a volume.

``kind = "slice"`` cards run in the 2-D slice runtime
(:class:`~scp_node.inference.predictor.Predictor`), ``kind = "volume"`` cards in the 3-D
sliding-window runtime (:class:`~scp_node.inference.runtime.volume.VolumePredictor`).
:func:`load_runtime` picks one at model load.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from scp_node.inference.registry import BundleSpec, ModelSpec

__all__ = ["Runtime", "load_runtime"]


class Runtime(Protocol):
    """What the worker calls: arrays in, a label map on the same grid out."""

    @property
    def device(self) -> str: ...

    def predict(
        self,
        volume: npt.NDArray[np.floating],
        spacing_zyx: tuple[float, float, float],
        direction: npt.NDArray[np.float64] | None = None,
    ) -> npt.NDArray[np.unsignedinteger]: ...


def load_runtime(
    spec: ModelSpec, device: str = "auto", threads: int = 0, variant: str = "fp32"
) -> Runtime:
    """The runtime for ``spec``, its weights loaded.

    Parameters
    ----------
    spec
        The model card.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:<n>"``.
    threads
        torch CPU threads when > 0.
    variant
        Volume cards: ``"fp32"`` (the torch network) or an exported (``onnx``) variant,
        whose networks replace the torch ones (pre- and post-processing stay).

    Raises
    ------
    ModelError
        The weights cannot be loaded (the message names the file and key), or the format
        needs a package that is not installed.
    ValueError
        Unknown device, or CUDA asked for but unavailable.
    """
    if spec.kind == "slice":
        from scp_node.inference.predictor import Predictor

        predictor = Predictor(device, threads=threads)
        predictor.load(spec)
        return predictor
    from scp_node.errors import ModelError
    from scp_node.inference.runtime.volume import VolumeModel, VolumePredictor

    runtime = VolumePredictor(device, threads=threads)
    model: VolumeModel
    if spec.format == "nnunetv2":
        try:
            from scp_node.inference.formats.nnunetv2 import load_nnunet
        except ImportError as exc:
            raise ModelError(
                f"{spec.directory / 'model.toml'}: format 'nnunetv2' needs the nnunetv2 "
                f"package: {exc}"
            ) from exc
        assert spec.nnunet is not None  # complete_card fills it
        nnunet = spec.nnunet
        model = load_nnunet(
            spec.weights_path,
            nnunet.configuration or "3d_fullres",
            tuple(nnunet.folds),
            checkpoint=nnunet.checkpoint,
            mirroring=nnunet.mirroring,
            tile_step_size=nnunet.tile_step_size,
            orientation=nnunet.orientation,
            device=runtime.torch_device,
        )
    elif spec.format == "monai_bundle":
        try:
            from scp_node.inference.formats.monai_bundle import load_bundle
        except ImportError as exc:
            raise ModelError(
                f"{spec.directory / 'model.toml'}: format 'monai_bundle' needs the monai "
                f"package: {exc}"
            ) from exc
        bundle = spec.bundle or BundleSpec()
        model = load_bundle(
            spec.weights_path,
            {label.value for label in spec.labels},
            config=bundle.config,
            orientation=bundle.orientation,
            device=runtime.torch_device,
        )
    else:
        from scp_node.inference.formats.native import load_native

        model = load_native(spec, runtime.torch_device)
    if variant != "fp32":
        from scp_node.inference.runtime.onnx import exported_networks

        model.networks = exported_networks(spec, variant, threads)
        runtime.variant = variant
    runtime.load_model(model)
    return runtime
