"""Variant verification pieces: the card's runtime order and references, the Dice and
logit-error gate, a card without a reference case, and labels from logits."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from scp_node.errors import ModelError
from scp_node.inference.nets import AttentionUNet
from scp_node.inference.predictor import Predictor, class_argmax, labels_from_logits
from scp_node.inference.preprocess import resample_inplane
from scp_node.inference.registry import ModelSpec
from scp_node.inference.verify import (
    ReferenceCase,
    VariantCheck,
    VariantSelection,
    check_variant,
    label_dice,
    machine_key,
    select_variant,
)

CARD = """
name = "tiny"
version = "1"

[weights]
format = "state_dict"
file = "weights.pt"
architecture = "attention_unet"
params = { in_channels = 1, num_classes = 3, base_channels = 4, depth = 2 }

[[labels]]
value = 1
name = "liver"
category = { code = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
type = { code = "10200004", scheme = "SCT", meaning = "Liver" }

[[labels]]
value = 2
name = "spleen"
category = { code = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }
type = { code = "78961009", scheme = "SCT", meaning = "Spleen" }

[variants.copy]
format = "state_dict"
file = "weights.pt"
architecture = "attention_unet"
params = { in_channels = 1, num_classes = 3, base_channels = 4, depth = 2 }

[variants.export]
format = "state_dict"
file = "weights.pt"
architecture = "attention_unet"
params = { in_channels = 1, num_classes = 3, base_channels = 4, depth = 2 }
source = "copy"
"""


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(AttentionUNet(1, 3, base_channels=4, depth=2).state_dict(), tmp_path / "weights.pt")
    (tmp_path / "model.toml").write_text(CARD)
    return tmp_path


def _with_reference(model_dir: Path, extra: str = "") -> ModelSpec:
    spec = ModelSpec.from_model_dir(model_dir)
    predictor = Predictor("cpu", threads=1)
    predictor.load(spec, "fp32")
    inputs = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = predictor.logits(inputs).numpy()
    ReferenceCase(inputs.numpy(), {"fp32": logits, "copy": logits}).save(model_dir / "ref.npz")
    card = model_dir / "model.toml"
    card.write_text(card.read_text() + f'\n[verify]\nfile = "ref.npz"\n{extra}')
    return ModelSpec.from_model_dir(model_dir)


class _Shifted(nn.Module):
    """The wrapped network with every logit moved by ``shift`` (same argmax), or with its
    classes rotated (a 'variant' that disagrees everywhere)."""

    def __init__(self, net: nn.Module, shift: float = 0.0, *, rotate: bool = False) -> None:
        super().__init__()
        self.net, self.shift, self.rotate = net, shift, rotate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x) + self.shift
        return out[:, [1, 2, 0]] if self.rotate else out


def test_runtime_auto_order_and_references(model_dir: Path) -> None:
    card = model_dir / "model.toml"
    card.write_text(CARD + '\n[runtime]\ncpu = "auto"\ncpu_order = ["export", "copy"]\n')
    spec = ModelSpec.from_model_dir(model_dir)
    assert spec.cpu_candidates() == ["export", "copy", "fp32"]
    assert spec.cpu_candidates("copy") == ["copy", "export", "fp32"]
    assert spec.variant_for("cpu") == "export"
    assert spec.reference_of("export") == "copy"
    assert spec.reference_of("copy") == "copy"
    assert spec.reference_of("fp32") == "fp32"
    card.write_text(CARD + '\n[runtime]\ncpu_order = ["nope"]\n')
    with pytest.raises(ModelError, match="cpu_order names unknown variant"):
        ModelSpec.from_model_dir(model_dir)
    card.write_text(CARD + '\n[runtime]\ncuda = "auto"\n')
    with pytest.raises(ModelError, match=r"runtime\.cuda names unknown variant"):
        ModelSpec.from_model_dir(model_dir)
    card.write_text(CARD + '\n[verify]\nfile = "absent.npz"\n')
    with pytest.raises(ModelError, match=r"verify\.file"):
        ModelSpec.from_model_dir(model_dir)


def test_a_selection_logs_each_rejection_and_the_choice(caplog: pytest.LogCaptureFixture) -> None:
    rejected = VariantCheck("int8", False, reason="Dice 0.50 < 0.99 (liver)")
    checks = (rejected, VariantCheck("fp32", True))
    cached = VariantSelection("tiny", "cpu", "auto", "fp32", checks, True, True, 1.234)
    timed_now = VariantSelection("tiny", "cpu", "auto", "fp32", checks, True, False, 1.234)
    log = logging.getLogger("tests.selection")
    with caplog.at_level(logging.INFO, logger="tests.selection"):
        cached.log(log)
        timed_now.log(log)
    assert [(r.levelno, r.name, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "tests.selection", "model tiny: " + rejected.describe()),
        (
            logging.INFO,
            "tests.selection",
            "model tiny runs variant fp32 (requested auto; 1.23 s to verify, timings cached)",
        ),
        (logging.WARNING, "tests.selection", "model tiny: " + rejected.describe()),
        (
            logging.INFO,
            "tests.selection",
            "model tiny runs variant fp32 (requested auto; 1.23 s to verify)",
        ),
    ]


def test_label_dice_per_label() -> None:
    a = np.array([[0, 1, 1, 2]])
    b = np.array([[0, 1, 0, 0]])
    assert label_dice(a, b, 3) == [pytest.approx(2 / 3), 0.0]
    assert label_dice(a * 0, b * 0, 3) == [1.0, 1.0]


def test_check_rejects_a_disagreeing_variant_and_reports_every_label(model_dir: Path) -> None:
    spec = _with_reference(model_dir)
    assert spec.verify.file is not None
    case = ReferenceCase.load(model_dir / spec.verify.file)
    predictor = Predictor("cpu", threads=1)
    predictor.load(spec, "export")
    good = check_variant(predictor, spec, case, rounds=2)
    assert good.ok and good.dice == {"liver": 1.0, "spleen": 1.0}
    assert good.ms_per_slice is not None and good.timed_runs == 2
    assert "vs copy" in good.reason

    rotated = _Shifted(predictor._module, rotate=True)  # type: ignore[arg-type]
    predictor.load_module(rotated, spec)
    predictor._variant = "export"
    bad = check_variant(predictor, spec, case)
    assert not bad.ok and set(bad.dice) == {"liver", "spleen"}
    assert min(bad.dice.values()) < 0.5
    assert bad.max_logit_error is not None and bad.max_logit_error > 0
    assert bad.describe().startswith("variant export rejected on this machine: Dice 0.")


def test_logit_error_bound(model_dir: Path) -> None:
    spec = _with_reference(model_dir, "max_logit_error = 0.001\n")
    assert spec.verify.file is not None
    case = ReferenceCase.load(model_dir / spec.verify.file)
    predictor = Predictor("cpu", threads=1)
    predictor.load(spec, "copy")
    assert check_variant(predictor, spec, case).ok
    predictor.load_module(_Shifted(predictor._module, 0.01), spec)  # type: ignore[arg-type]
    predictor._variant = "copy"
    check = check_variant(predictor, spec, case)
    assert not check.ok and check.reason.startswith("max logit error 0.01 > 0.001")


def test_no_reference_case_runs_unverified(model_dir: Path) -> None:
    spec = ModelSpec.from_model_dir(model_dir)
    predictor, selection = select_variant(
        spec, lambda: Predictor("cpu", threads=1), requested="copy"
    )
    assert predictor.variant == "copy" and selection.chosen == "copy"
    assert not selection.verified and selection.checks == ()


def test_machine_key_follows_files_and_threads(model_dir: Path) -> None:
    spec = _with_reference(model_dir)
    key = machine_key(spec, ["fp32"], 1)
    assert key == machine_key(spec, ["fp32"], 1)
    assert key != machine_key(spec, ["fp32"], 2)
    (model_dir / "weights.pt").write_bytes((model_dir / "weights.pt").read_bytes() + b"x")
    assert key != machine_key(spec, ["fp32"], 1)


def test_labels_from_logits_argmax_without_softmax() -> None:
    logits = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    # At the model's resolution: the plain argmax.
    assert torch.equal(labels_from_logits(logits, (20, 20)), logits.argmax(dim=1).int())
    resized = labels_from_logits(logits, (50, 45))
    assert torch.equal(resized, class_argmax(resample_inplane(logits, (50, 45))))
    # Two classes: only the margin is resampled, same labels as resampling both.
    two = logits[:, :2]
    assert torch.equal(
        labels_from_logits(two, (50, 45)), class_argmax(resample_inplane(two, (50, 45)))
    )
