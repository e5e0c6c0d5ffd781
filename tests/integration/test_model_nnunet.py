"""nnU-Net v2 trained-model folders run by the node's volume runtime, against nnU-Net itself.

The folder is the real format, built by the session fixture ``nnunet_folder`` with
nnU-Net's own planner from subject A (``tests/support/nnunet_folder.py``). The reference
is ``nnUNetPredictor`` on the same image and folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from scp_node.errors import ModelError
from scp_node.inference.formats.nnunetv2 import load_checkpoint
from scp_node.inference.registry import ModelSpec
from scp_node.inference.runtime import load_runtime
from tests.support.nnunet_folder import reference_predictor
from tests.support.seg_checks import dice_score

pytestmark = pytest.mark.slow


class _Payload:
    """Stands for an object only arbitrary pickle can rebuild (it could be any code)."""


def _model_dir(root: Path, folder: Path, extra: str = "") -> Path:
    directory = root / "nnunet-a"
    directory.mkdir(parents=True)
    (directory / "model.toml").write_text(
        f'format = "nnunetv2"\n{extra}\n[nnunet]\nfolder = "{folder}"\n', encoding="utf-8"
    )
    return directory


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def _subject_a_ras(shared_data: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Subject A as nnU-Net's SimpleITK reader gives it: (z, y, x), voxel axes to R, A, S."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(shared_data / "ct-abdomen-a" / "ct.nii.gz"))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return sitk.GetArrayFromImage(image).astype(np.float32), spacing  # type: ignore[return-value]


def test_minimal_card_takes_labels_and_codes_from_the_folder(
    nnunet_folder: Path, tmp_path: Path
) -> None:
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, nnunet_folder))
    assert spec.name == "nnunet-a"
    assert spec.kind == "volume" and spec.format == "nnunetv2"
    assert spec.nnunet is not None and spec.nnunet.configuration == "3d_fullres"
    by_name = {label.name: label for label in spec.labels}
    assert sorted(by_name) == ["kidney_left", "kidney_right", "liver", "spleen"]
    assert by_name["liver"].value == 1
    assert (by_name["liver"].type.code, by_name["liver"].type.scheme) == ("10200004", "SCT")
    assert by_name["liver"].category.code == "123037004"
    assert by_name["liver"].modifier is None
    kidney = by_name["kidney_left"]
    assert kidney.type.code == "64033007"
    assert kidney.modifier is not None
    assert (kidney.modifier.code, kidney.modifier.meaning) == ("7771000", "Left")
    assert by_name["kidney_right"].modifier is not None
    assert by_name["kidney_right"].modifier.code == "24028007"
    assert spec.series.modalities == ("CT",)


def test_matches_nnunet_predictor_on_the_same_image_and_folder(
    nnunet_folder: Path, tmp_path: Path, shared_data: Path
) -> None:
    torch.set_num_threads(2)
    image_ras, spacing = _subject_a_ras(shared_data)
    reference = reference_predictor(nnunet_folder)
    expected = reference.predict_single_npy_array(image_ras[None], {"spacing": list(spacing)})

    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, nnunet_folder))
    runtime = load_runtime(spec, "cpu")
    # The worker hands over DICOM pixel order (x to Left, y to Posterior): RAS flipped in y, x.
    image_lps = np.ascontiguousarray(image_ras[:, ::-1, ::-1])
    labels = runtime.predict(image_lps, spacing)[:, ::-1, ::-1]

    assert labels.shape == expected.shape == image_ras.shape
    found = set(np.unique(expected)) | set(np.unique(labels))
    assert found - {0}, "the reference found no label at all: the check would be empty"
    for label in spec.labels:
        dice = dice_score(labels == label.value, expected == label.value)
        assert dice >= 0.99, f"{label.name}: Dice {dice:.4f} against nnUNetPredictor"


def test_streamed_preparation_equals_nnunets_preprocessing(
    nnunet_folder: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slab by slab from int16 (no float32 copy of the volume): nnU-Net's crop box, shapes
    and, up to float rounding, its preprocessed array."""
    import warnings

    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    from scp_node.inference.formats import nnunetv2

    image_ras, spacing = _subject_a_ras(shared_data)
    # Zeros around part of the volume, so the crop box is not the whole grid.
    source = np.zeros((image_ras.shape[0] + 5, *image_ras.shape[1:]), dtype=np.int16)
    source[3:-2, 4:, :-6] = np.rint(image_ras[:, 4:, :-6])
    model = nnunetv2.load_nnunet(nnunet_folder, "3d_fullres", (0,))
    # A few slices per slab, so the volume takes many.
    monkeypatch.setattr(nnunetv2, "_SLAB_BYTES", 4 * 7 * source.shape[1] * source.shape[2])
    prepared = model.prepare(source, spacing)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, _seg, properties = DefaultPreprocessor(verbose=False).run_case_npy(
            source[None].astype(np.float32),
            None,
            {"spacing": list(spacing)},
            model._plans,
            model._configuration,
            model._dataset,
        )
    box = tuple(slice(int(a), int(b)) for a, b in properties["bbox_used_for_cropping"])
    assert prepared.bbox == box and prepared.bbox[0] == slice(3, source.shape[0] - 2)
    assert prepared.crop_shape == tuple(properties["shape_after_cropping_and_before_resampling"])
    assert prepared.full_shape == source.shape
    assert prepared.data.dtype == np.float32 and prepared.data.shape == expected.shape
    assert np.abs(prepared.data - expected).max() < 1e-3


def test_a_checkpoint_that_needs_arbitrary_pickle_is_refused(
    nnunet_folder: Path, tmp_path: Path
) -> None:
    folder = _copy(nnunet_folder, tmp_path)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["trainer"] = _Payload()
    torch.save(checkpoint, path)
    with pytest.raises(ModelError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert str(path) in message and "refused" in message and "_Payload" in message
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, folder))
    with pytest.raises(ModelError, match="refused"):
        load_runtime(spec, "cpu")


def test_the_node_loads_checkpoints_with_numpy_scalars_as_data(nnunet_folder: Path) -> None:
    checkpoint = load_checkpoint(nnunet_folder / "fold_0" / "checkpoint_final.pth")
    assert isinstance(checkpoint["_best_ema"], np.floating)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"


def test_a_plans_file_naming_another_class_is_refused(nnunet_folder: Path, tmp_path: Path) -> None:
    folder = _copy(nnunet_folder, tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["arch_kwargs"]["nonlin"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, folder))
    with pytest.raises(ModelError, match=r"plans\.json.*arch_kwargs\.nonlin 'os\.system'"):
        load_runtime(spec, "cpu")

    arch["arch_kwargs"]["nonlin"] = "torch.nn.LeakyReLU"
    arch["network_class_name"] = "subprocess.Popen"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ModelError, match=r"network_class_name 'subprocess\.Popen'"):
        load_runtime(spec, "cpu")


def test_a_label_without_a_code_is_refused_naming_file_and_key(
    nnunet_folder: Path, tmp_path: Path
) -> None:
    folder = _copy(nnunet_folder, tmp_path)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["mystery_structure"] = 5
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ModelError, match=r"dataset\.json: labels\.mystery_structure: no SNOMED"):
        ModelSpec.from_model_dir(_model_dir(tmp_path, folder))


def test_card_labels_replace_the_folder_labels(nnunet_folder: Path, tmp_path: Path) -> None:
    extra = (
        'name = "liver-only"\nversion = "2.0"\n[[labels]]\nvalue = 1\nname = "liver"\n'
        'category = { code = "123037004", scheme = "SCT", meaning = "Anatomical Structure" }\n'
        'type = { code = "10200004", scheme = "SCT", meaning = "Liver" }\n'
    )
    spec = ModelSpec.from_model_dir(_model_dir(tmp_path, nnunet_folder, extra))
    assert (spec.name, spec.version) == ("liver-only", "2.0")
    assert [label.name for label in spec.labels] == ["liver"]


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("plans.json", r"plans\.json not found"),
        ("fold_0/checkpoint_final.pth", r"nnunet\.folds: .*fold_0/checkpoint_final\.pth not found"),
    ],
)
def test_an_incomplete_folder_is_refused_naming_the_file(
    nnunet_folder: Path, tmp_path: Path, remove: str, message: str
) -> None:
    folder = _copy(nnunet_folder, tmp_path)
    (folder / remove).unlink()
    with pytest.raises(ModelError, match=message):
        ModelSpec.from_model_dir(_model_dir(tmp_path, folder))


def test_a_folder_inside_the_model_directory_is_found_from_a_relative_path(
    nnunet_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "models" / "totalseg-like"
    shutil.copytree(nnunet_folder, directory / nnunet_folder.name)
    (directory / "model.toml").write_text(
        f'format = "nnunetv2"\n[nnunet]\nfolder = "{nnunet_folder.name}"\n', encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec.from_model_dir(Path("models") / "totalseg-like")
    assert spec.weights_path.resolve() == (directory / nnunet_folder.name).resolve()
    runtime = load_runtime(spec, "cpu")
    assert runtime.device == "cpu"
