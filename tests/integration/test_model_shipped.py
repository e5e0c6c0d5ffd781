"""The shipped models, evaluated through the worker's own path on held-out subject B, reach
the Dice their cards record; each CPU variant is int8 and within 0.01 of fp32 and of the fp32
network it was quantised from (ct-abdomen: pruned + int8; ct-spleen: int8 of fp32).

Tolerance: the recorded figures come from ``scp-node model evaluate`` on the build machine.
fp32 and int8 kernels pick different vector code paths on other CPUs (AVX2, AVX-512, VNNI),
which moves a handful of boundary pixels out of ~100k liver pixels: we allow 0.005 Dice,
well under the 0.01 gap the issue allows between variants and far below what a wrong
mapping, flipped label or broken variant costs (tenths).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import ModelSpec
from scp_node.training.evaluate import evaluate_series

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = REPO_ROOT / "models"
#: Shipped model -> the least fp32 Dice on B its card may record for each label (ct-spleen:
#: issue #16's shipping rule, held-out B Dice >= 0.85 for every seed of its design).
SHIPPED = {"ct-abdomen": 0.90, "ct-spleen": 0.85}
TOLERANCE = 0.005


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request: pytest.FixtureRequest) -> tuple[Path, ModelSpec]:
    folder = MODELS / request.param
    return folder, ModelSpec.from_model_dir(folder)


def test_card_declares_variants_metrics_and_runtime(shipped: tuple[Path, ModelSpec]) -> None:
    folder, spec = shipped
    cpu_variant = spec.runtime.cpu
    cpu = spec.variant(cpu_variant)
    assert cpu.precision == "int8"
    assert spec.runtime.cuda == "fp32"
    source = spec.reference_of(cpu_variant)
    recorded = spec.metrics["heldout_b"]
    assert {"fp32", source, cpu_variant} <= set(recorded)
    for label in spec.labels:
        key = f"dice_{label.name}"
        assert recorded["fp32"][key] >= SHIPPED[folder.name]
        # The gates: the CPU variant loses at most 0.01 against fp32, and int8 moves at most
        # 0.01 away from the fp32 network it was quantised from.
        assert recorded[cpu_variant][key] >= recorded["fp32"][key] - 0.01
        assert abs(recorded[cpu_variant][key] - recorded[source][key]) <= 0.01


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fp32", "cpu-runtime"])
def test_shipped_model_reaches_recorded_dice_on_subject_b(
    which: str, shipped: tuple[Path, ModelSpec], shared_data: Path
) -> None:
    folder, spec = shipped
    variant = spec.runtime.cpu if which == "cpu-runtime" else "fp32"
    subject = shared_data / "ct-abdomen-b"
    scores = evaluate_series(
        folder,
        subject / "dicom",
        subject / "labels.nii.gz",
        variant=variant,
        predictor=Predictor("cpu", threads=1),
    )
    recorded = spec.metrics["heldout_b"][variant]
    for label in spec.labels:
        key = f"dice_{label.name}"
        assert scores[key] >= recorded[key] - TOLERANCE, (variant, key, scores[key])
        assert scores[f"hd95_mm_{label.name}"] < 2 * recorded[f"hd95_mm_{label.name}"] + 2.0
