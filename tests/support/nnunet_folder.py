"""Build a real nnU-Net v2 trained-model folder from subject A, as nnU-Net itself would.

Run as a script (``python -m tests.support.nnunet_folder OUT DATA``): nnU-Net's planner
starts worker processes with ``spawn`` and reads ``nnUNet_raw``/``nnUNet_preprocessed``/
``nnUNet_results`` from the environment, so it runs in its own process, with those set to
folders under ``OUT``. Steps: a one-case raw dataset from subject A (liver, spleen,
kidneys), nnU-Net's fingerprint extraction and experiment planner, the 3d_fullres plan
reduced (features / 8, patch 64^3, so the checkpoint is a few hundred kB and a study needs
several windows), the network from the plans trained for a few steps on the case as
nnU-Net preprocesses it, and a checkpoint laid out as nnU-Net's trainer writes it. The
folder is ``OUT/nnUNet_results/Dataset777_SubjectA/nnUNetTrainer__nnUNetPlans__3d_fullres``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

DATASET_ID = 777
DATASET_NAME = f"Dataset{DATASET_ID}_SubjectA"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
#: Our label value -> (structure name, TotalSegmentator 'total' value in labels.nii.gz).
LABELS = {1: ("liver", 5), 2: ("spleen", 1), 3: ("kidney_right", 2), 4: ("kidney_left", 3)}
PATCH = [32, 32, 32]
STAGES = 4
TRAIN_STEPS = 10
#: The raw dataset is subject A at twice its voxel size (6 mm): the plan's spacing is then
#: 6 mm, so a 3 mm series sent to the node is resampled both ways, and the network is small.
DOWNSAMPLE = 2


def trained_folder(out: Path) -> Path:
    """Where :func:`build` leaves the trained-model folder."""
    return out / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER


def reference_predictor(folder: Path) -> Any:
    """nnU-Net's own ``nnUNetPredictor`` on the CPU for ``folder`` (fold 0, final
    checkpoint): Gaussian-weighted windows at half-tile steps, no mirroring, quiet."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=False,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
    return predictor


def _raw_dataset(raw: Path, data: Path) -> None:
    import nibabel as nib

    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    ct = nib.load(data / "ct-abdomen-a" / "ct.nii.gz")
    source = nib.load(data / "ct-abdomen-a" / "labels.nii.gz")
    affine = ct.affine.copy()
    affine[:3, :3] *= DOWNSAMPLE
    # The coarse voxel's centre is the mean of the fine centres it covers.
    affine[:3, 3] += ct.affine[:3, :3] @ np.full(3, (DOWNSAMPLE - 1) / 2)
    d = DOWNSAMPLE
    image = np.asarray(ct.dataobj, dtype=np.float32)
    shape = [s // d * d for s in image.shape]
    image = image[: shape[0], : shape[1], : shape[2]]
    coarse = image.reshape(shape[0] // d, d, shape[1] // d, d, shape[2] // d, d).mean((1, 3, 5))
    nib.save(nib.Nifti1Image(coarse, affine), folder / "imagesTr" / "A_000_0000.nii.gz")
    total = np.asarray(source.dataobj).astype(np.int16)[
        : shape[0] : d, : shape[1] : d, : shape[2] : d
    ]
    ours = np.zeros(total.shape, dtype=np.uint8)
    for value, (_name, total_value) in LABELS.items():
        ours[total == total_value] = value
    nib.save(nib.Nifti1Image(ours, affine), folder / "labelsTr" / "A_000.nii.gz")
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: v for v, (name, _t) in LABELS.items()}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _reduce_plans(plans: dict[str, object]) -> dict[str, object]:
    configurations = plans["configurations"]
    assert isinstance(configurations, dict)
    config = configurations["3d_fullres"]
    kwargs = config["architecture"]["arch_kwargs"]
    kwargs["n_stages"] = STAGES
    kwargs["features_per_stage"] = [max(2, f // 8) for f in kwargs["features_per_stage"]][:STAGES]
    for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
        kwargs[key] = kwargs[key][:STAGES]
    kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: STAGES - 1]
    config["patch_size"] = PATCH
    config["batch_size"] = 2
    return plans


def build(out: Path, data: Path) -> Path:
    """Build the folder under ``out`` from the shared data at ``data``; returns it."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (out / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(out / name)
    _raw_dataset(out / "nnUNet_raw", data)

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    extract_fingerprints([DATASET_ID], num_processes=1, verbose=False, show_progress_bar=False)
    plan_experiments([DATASET_ID])
    preprocessed = out / "nnUNet_preprocessed" / DATASET_NAME
    plans = _reduce_plans(json.loads((preprocessed / "nnUNetPlans.json").read_text()))
    dataset = json.loads((out / "nnUNet_raw" / DATASET_NAME / "dataset.json").read_text())
    folder = trained_folder(out)
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    raw = out / "nnUNet_raw" / DATASET_NAME
    image, properties = SimpleITKIO().read_images([str(raw / "imagesTr" / "A_000_0000.nii.gz")])
    seg, _ = SimpleITKIO().read_seg(str(raw / "labelsTr" / "A_000.nii.gz"))
    data_pp, seg_pp, _props = DefaultPreprocessor(verbose=False).run_case_npy(
        image, seg, properties, plans_manager, configuration, dataset
    )

    torch.manual_seed(0)
    torch.set_num_threads(2)
    network = get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        1,
        len(LABELS) + 1,
        deep_supervision=False,
    )
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    x_all = torch.from_numpy(np.ascontiguousarray(data_pp)).float()
    y_all = torch.from_numpy(np.ascontiguousarray(seg_pp[0])).long().clamp(min=0)
    rng = np.random.default_rng(0)
    losses: list[float] = []
    network.train()
    for _step in range(TRAIN_STEPS):
        corner = [
            int(rng.integers(0, max(1, s - p + 1)))
            for s, p in zip(x_all.shape[1:], PATCH, strict=True)
        ]
        window = tuple(slice(c, c + p) for c, p in zip(corner, PATCH, strict=True))
        x = x_all[(slice(None), *window)][None]
        y = y_all[window][None]
        pad = [(0, p - s) for s, p in zip(x.shape[2:], PATCH, strict=True)]
        if any(after for _before, after in pad):
            flat = [v for before_after in reversed(pad) for v in before_after]
            x = torch.nn.functional.pad(x, flat)
            y = torch.nn.functional.pad(y, flat)
        loss = torch.nn.functional.cross_entropy(network(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": None,
        "grad_scaler_state": None,
        # nnU-Net's trainer logs numpy floats: the loader must accept them as data.
        "logging": {"train_losses": [np.float64(v) for v in losses]},
        "_best_ema": np.float64(min(losses)),
        "current_epoch": 1,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": 0,
            "dataset_json": dataset,
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))  # noqa: T201
