"""The reference case of a model card: a few real slices and the fp32 logits on them.

Made once on the build machine (``scp-node model reference``) and stored next to the card
(``[verify] file``); at start-up :mod:`scp_node.inference.verify` runs every variant the node
may use on it and compares with the stored fp32 output.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from scp_node.dicom.volume import load_volume
from scp_node.errors import ModelError
from scp_node.inference.predictor import Predictor, model_input
from scp_node.inference.registry import CARD_FILE, REFERENCE_VARIANT, ModelSpec
from scp_node.inference.verify import REFERENCE_FILE, ReferenceCase
from scp_node.training.variants import replace_table

__all__ = ["make_reference_case", "reference_from_inputs", "write_reference"]

logger = logging.getLogger(__name__)


def make_reference_case(
    model_dir: Path,
    dicom_dir: Path,
    *,
    slices: int = 6,
    min_dice: float = 0.99,
    file: str = REFERENCE_FILE,
) -> ReferenceCase:
    """Write ``model_dir/<file>`` from a DICOM series and record ``[verify]`` in the card.

    The slices are ``slices`` of the series (evenly spread among the ``2 * slices`` on
    which the fp32 network finds the most foreground), so every label's Dice is measured on
    real structure, not on empty background. The fp32 output of ``[weights]`` and of every
    other ``state_dict`` variant is stored (exported and int8 variants are compared with
    the network they were made from).

    Parameters
    ----------
    model_dir
        The model folder (its fp32 ``[weights]`` compute the reference logits).
    dicom_dir
        A series the model accepts (``*.dcm``); its pixels are stored at the model spacing
        (no header, no identifiers).
    slices
        How many slices to keep (a few MB at most).
    min_dice
        The card's ``verify.min_dice``.
    file
        Name of the ``.npz`` written next to the card.

    Returns
    -------
    ReferenceCase
        The case written.

    Raises
    ------
    ModelError
        No DICOM file in ``dicom_dir`` or the card cannot be read.
    """
    paths = sorted(dicom_dir.glob("*.dcm"))
    if not paths:
        raise ModelError(f"no .dcm files in {dicom_dir}")
    spec = ModelSpec.from_model_dir(model_dir)
    volume = load_volume(paths)
    case = reference_from_inputs(
        spec, model_input(spec, volume.array, volume.spacing_zyx), slices=slices
    )
    write_reference(model_dir, case, min_dice=min_dice, file=file)
    return case


def reference_from_inputs(
    spec: ModelSpec, inputs: torch.Tensor, *, slices: int = 6
) -> ReferenceCase:
    """A reference case from prepared model inputs (N, C, rows, columns) at the model
    spacing: ``slices`` of them with the most foreground, and the fp32 logits of
    ``[weights]`` and of every other ``state_dict`` variant on them."""
    sources = [REFERENCE_VARIANT]
    sources += [n for n, w in spec.variants.items() if w.format == "state_dict"]
    outputs: dict[str, torch.Tensor] = {}
    for name in sources:
        predictor = Predictor("cpu")
        predictor.load(spec, name)
        with torch.inference_mode():
            outputs[name] = torch.cat([predictor.logits(b) for b in torch.split(inputs, 8)])
    reference = outputs[REFERENCE_VARIANT]
    foreground = (reference.argmax(dim=1) > 0).flatten(1).sum(dim=1).numpy()
    ranked = np.argsort(-foreground, kind="stable")[: slices * 2]
    keep = np.sort(ranked[np.linspace(0, len(ranked) - 1, min(slices, len(ranked))).astype(int)])
    return ReferenceCase(
        inputs=inputs[keep].numpy().astype(np.float32),
        logits={n: o[keep].numpy().astype(np.float32) for n, o in outputs.items()},
    )


def write_reference(
    model_dir: Path, case: ReferenceCase, *, min_dice: float = 0.99, file: str = REFERENCE_FILE
) -> ModelSpec:
    """Save ``case`` next to the card, record ``[verify]`` and return the re-read card.

    Raises
    ------
    ModelError
        The card becomes invalid.
    """
    case.save(model_dir / file)
    card = model_dir / CARD_FILE
    card.write_text(replace_table(card.read_text(), "verify", {"file": file, "min_dice": min_dice}))
    logger.info("reference case of %s: %d slices", model_dir.name, len(case.inputs))
    return ModelSpec.from_model_dir(model_dir)
