"""MONAI bundles read as data: what the node takes from a bundle's config, and what it
refuses (a bundle config is code for MONAI: ``$`` expressions, any ``_target_``).

The bundles here are the fixture's configs with untrained weights
(:func:`tests.support.monai_bundle.write_bundle`); running a trained one against
``monai.bundle run`` is in ``tests/integration/test_model_bundle.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from scp_node.errors import ModelError
from scp_node.inference.formats.monai_bundle import read_bundle
from scp_node.inference.registry import ModelSpec
from scp_node.inference.runtime import load_runtime
from tests.support.monai_bundle import inference_config, write_bundle


def _model_dir(root: Path, bundle: Path, card: str = "", bundle_keys: str = "") -> Path:
    directory = root / "bundle-a"
    directory.mkdir(parents=True)
    (directory / "model.toml").write_text(
        f'format = "monai_bundle"\n{card}\n[bundle]\nfolder = "{bundle}"\n{bundle_keys}\n',
        encoding="utf-8",
    )
    return directory


def test_a_yaml_config_with_a_hard_coded_cuda_device_runs_on_the_cpu(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    config = inference_config()
    assert config["device"] == "$torch.device('cuda:0')"
    # References to plain values are followed, as MONAI's parser does.
    config["roi"] = [32, 32, 32]
    config["inferer"]["roi_size"] = "@roi"
    (bundle / "configs" / "inference.json").unlink()
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(config))
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, bundle))
    assert spec.kind == "volume" and spec.format == "monai_bundle"
    plan = read_bundle(bundle)
    assert plan.config.name == "inference.yaml" and plan.roi_size == (32, 32, 32)
    runtime = load_runtime(spec, "cpu")
    assert runtime.device == "cpu"
    volume = np.zeros((12, 20, 24), dtype=np.float32)
    labels = runtime.predict(volume, (3.0, 3.0, 3.0))
    assert labels.shape == volume.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_a_bundle_without_orientationd_needs_the_cards_orientation(tmp_path: Path) -> None:
    config = inference_config()
    del config["preprocessing"]["transforms"][2]
    bundle = write_bundle(tmp_path / "bundle", config)
    with pytest.raises(ModelError, match=r"no Orientationd: set \[bundle\] orientation"):
        ModelSpec.from_model_dir(_model_dir(tmp_path / "a", bundle))
    card = ModelSpec.from_model_dir(
        _model_dir(tmp_path / "b", bundle, bundle_keys='orientation = "LPS"')
    )
    assert card.bundle is not None and card.bundle.orientation == "LPS"
    assert read_bundle(bundle, orientation="LPS").orientation == "LPS"


@pytest.mark.parametrize(
    ("missing", "message"),
    [
        ("configs/metadata.json", r"incomplete: .*metadata\.json not found"),
        ("configs/inference.json", r"incomplete: no configs/inference\.json"),
        ("models/model.pt", r"incomplete: no models/model\.ts or models/model\.pt"),
    ],
)
def test_an_incomplete_bundle_is_refused_with_the_file_named(
    tmp_path: Path, missing: str, message: str
) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    (bundle / missing).unlink()
    with pytest.raises(ModelError, match=message):
        ModelSpec.from_model_dir(_model_dir(tmp_path, bundle))


def _network_arg(config: dict[str, Any]) -> str:
    config["network_def"]["channels"] = "$__import__('os').system('touch pwned') or [8, 16, 32]"
    return "network_def::channels"


def _network_target(config: dict[str, Any]) -> str:
    config["network_def"]["_target_"] = "subprocess.Popen"
    return "network_def::_target_"


def _network_not_allowed(config: dict[str, Any]) -> str:
    config["network_def"]["_target_"] = "monai.networks.nets.TorchVisionFCModel"
    return "network_def::_target_"


def _transform(config: dict[str, Any]) -> str:
    config["preprocessing"]["transforms"].insert(
        2, {"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x"}
    )
    return "preprocessing::transforms::2::_target_"


def _transform_argument(config: dict[str, Any]) -> str:
    config["pixdim"] = "$[6.0] * 3"
    config["preprocessing"]["transforms"][3]["pixdim"] = "@pixdim"
    return "pixdim"


def _transforms_expression(config: dict[str, Any]) -> str:
    config["preprocessing"]["transforms"] = "$@pre + []"
    return "preprocessing::transforms"


def _inferer(config: dict[str, Any]) -> str:
    config["inferer"] = "$monai.inferers.SlidingWindowInferer(roi_size=[32, 32, 32])"
    return "inferer"


def _macro(config: dict[str, Any]) -> str:
    config["preprocessing"]["transforms"][4]["a_min"] = "%configs/other.json::a_min"
    return "preprocessing::transforms::4::a_min"


def _unknown_argument(config: dict[str, Any]) -> str:
    config["preprocessing"]["transforms"][3]["scale_extent"] = True
    return "preprocessing::transforms::3::scale_extent"


def _device_argument(config: dict[str, Any]) -> str:
    config["preprocessing"]["transforms"][3]["pixdim"] = "@device"
    return "preprocessing::transforms::3::pixdim"


def _network_mode(config: dict[str, Any]) -> str:
    config["network_def"]["_mode_"] = "callable"
    return "network_def::_mode_"


REFUSALS = [
    _device_argument,
    _network_mode,
    _network_arg,
    _network_target,
    _network_not_allowed,
    _transform,
    _transform_argument,
    _transforms_expression,
    _inferer,
    _macro,
    _unknown_argument,
]


@pytest.mark.parametrize("change", REFUSALS, ids=lambda change: change.__name__.strip("_"))
def test_a_config_that_is_code_is_refused_with_the_key_named(
    tmp_path: Path, change: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = inference_config()
    key = change(config)
    bundle = write_bundle(tmp_path / "bundle", config)
    with pytest.raises(ModelError) as raised:
        ModelSpec.from_model_dir(_model_dir(tmp_path, bundle))
    message = str(raised.value)
    assert "inference.json" in message
    assert f"{key}:" in message, message
    assert not (tmp_path / "pwned").exists()


class _Payload:
    """Stands for an object only arbitrary pickle can rebuild (it could be any code)."""


def test_weights_that_need_arbitrary_pickle_are_refused(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({"model": state, "extra": _Payload()}, bundle / "models" / "model.pt")
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, bundle))
    with pytest.raises(ModelError, match=r"model\.pt: refused: .*arbitrary pickle"):
        load_runtime(spec, "cpu")


def test_labels_without_a_known_code_need_the_cards_labels(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "bundle")
    metadata_path = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] = "lesion of interest"
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(
        ModelError, match=r"channel_def\.2 \('lesion of interest'\).*\[\[labels\]\]"
    ):
        ModelSpec.from_model_dir(_model_dir(tmp_path / "a", bundle))
    card = "\n".join(
        [
            "[[labels]]",
            "value = 2",
            'name = "lesion"',
            'category = { code = "49755003", scheme = "SCT", meaning = "Morphologic abnormality" }',
            'type = { code = "52988006", scheme = "SCT", meaning = "Lesion" }',
        ]
    )
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path / "b", bundle, card))
    assert [label.name for label in spec.labels] == ["lesion"]
