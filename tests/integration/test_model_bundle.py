"""MONAI bundles run by the node's volume runtime, against the bundle's own config.

The bundle is the real format (Model Zoo layout), built by the session fixture
``monai_bundle`` (``tests/support/monai_bundle.py``); the reference is
``python -m monai.bundle run`` of its ``configs/inference.json`` on subject A's NIfTI.
A bundle config is code for MONAI; the node must read it as data and refuse the rest.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from scp_node.inference.formats.monai_bundle import read_bundle
from scp_node.inference.registry import ModelSpec
from scp_node.inference.runtime import load_runtime
from tests.support.monai_bundle import CHANNELS, inference_config
from tests.support.seg_checks import dice_score

pytestmark = pytest.mark.slow


def _model_dir(root: Path, bundle: Path, card: str = "") -> Path:
    directory = root / "bundle-a"
    directory.mkdir(parents=True)
    (directory / "model.toml").write_text(
        f'format = "monai_bundle"\n{card}\n[bundle]\nfolder = "{bundle}"\n', encoding="utf-8"
    )
    return directory


def _copy(bundle: Path, tmp_path: Path, config: dict[str, Any] | None = None) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    if config is not None:
        (copy / "configs" / "inference.json").write_text(json.dumps(config))
    return copy


def _as_runtime_input(
    image: Any,
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A NIfTI as the runtime takes a volume: (k, j, i) array, spacing, and the LPS
    direction of each array axis (from the NIfTI's RAS affine)."""
    affine = np.asarray(image.affine, dtype=np.float64)
    columns = affine[:3, :3] * np.array([[-1.0], [-1.0], [1.0]])  # RAS -> LPS
    spacing = np.linalg.norm(columns, axis=0)
    directions = (columns / spacing).T[::-1]  # rows: axes k, j, i
    data = np.asarray(image.dataobj, dtype=np.float32).transpose(2, 1, 0)
    return data, (float(spacing[2]), float(spacing[1]), float(spacing[0])), directions


def test_a_minimal_card_takes_labels_and_codes_from_the_bundle(
    monai_bundle: Path, tmp_path: Path
) -> None:
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, monai_bundle))
    assert spec.name == "bundle-a" and spec.version == "0.3.1"
    assert spec.kind == "volume" and spec.format == "monai_bundle"
    by_name = {label.name: label for label in spec.labels}
    assert sorted(by_name) == ["liver", "spleen"]
    assert by_name["liver"].value == 1 and by_name["spleen"].value == 2
    assert (by_name["liver"].type.code, by_name["liver"].type.scheme) == ("10200004", "SCT")
    assert by_name["spleen"].type.code == "78961009"
    assert spec.series.modalities == ("CT",)
    plan = read_bundle(monai_bundle)
    assert plan.orientation == "RAS" and plan.roi_size == (32, 32, 32)
    assert [step.name for step in plan.steps] == ["Spacing", "ScaleIntensityRange"]
    assert plan.weights.name == "model.pt" and plan.network is not None


def test_the_runtime_agrees_with_monai_bundle_run(
    monai_bundle: Path, monai_reference: Path, shared_data: Path, tmp_path: Path
) -> None:
    import nibabel as nib

    source = nib.load(shared_data / "ct-abdomen-a" / "ct.nii.gz")
    reference = nib.load(monai_reference)
    # Invertd put the reference back on the source grid: index by index is physical.
    assert reference.shape[:3] == source.shape
    assert np.allclose(reference.affine, source.affine, atol=1e-3)
    expected = np.asarray(reference.dataobj).astype(np.uint8).reshape(source.shape)

    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, monai_bundle))
    # The bundle hard-codes cuda:0; the node runs it where its own setting says.
    runtime = load_runtime(spec, "cpu", threads=2)
    volume, spacing, directions = _as_runtime_input(source)
    labels = runtime.predict(volume, spacing, directions).transpose(2, 1, 0)

    assert labels.shape == expected.shape
    for channel, (name, _total) in CHANNELS.items():
        assert (expected == channel).sum() > 500, f"{name}: the reference found too little"
        dice = dice_score(labels == channel, expected == channel)
        assert dice >= 0.99, f"{name}: Dice {dice:.4f} against monai.bundle run"


def test_torchscript_weights_are_preferred_and_need_no_network_definition(
    monai_bundle: Path, tmp_path: Path
) -> None:
    config = inference_config()
    # Never read: a TorchScript bundle's network comes from models/model.ts.
    config["network_def"] = {"_target_": "os.system", "command": f"touch {tmp_path}/never"}
    bundle = _copy(monai_bundle, tmp_path, config)
    plain = load_runtime(ModelSpec.from_model_dir(_model_dir(tmp_path / "a", monai_bundle)), "cpu")
    network = plain.model.networks[0]  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        # TorchScript is deprecated in torch 2.13 but is the format Zoo bundles ship.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, torch.zeros(1, 1, 32, 32, 32))
        torch.jit.save(traced, bundle / "models" / "model.ts")  # type: ignore[no-untyped-call]
    (bundle / "models" / "model.pt").unlink()
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path / "b", bundle))
    assert read_bundle(bundle).network is None
    scripted = load_runtime(spec, "cpu")

    volume = np.full((40, 48, 56), -100.0, dtype=np.float32)
    volume[10:30, 12:40, 8:30] = 80.0
    assert np.array_equal(
        scripted.predict(volume, (3.0, 3.0, 3.0)), plain.predict(volume, (3.0, 3.0, 3.0))
    )
    assert not (tmp_path / "never").exists()
