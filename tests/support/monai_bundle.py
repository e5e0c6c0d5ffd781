"""Build a real MONAI bundle from subject A, laid out as the MONAI Model Zoo lays them out.

``configs/inference.json`` follows the Model Zoo's segmentation bundles
(spleen_ct_segmentation): LoadImaged, EnsureChannelFirstd, Orientationd RAS, Spacingd,
ScaleIntensityRanged; a SlidingWindowInferer with Gaussian blending; Activationsd, Invertd,
AsDiscreted, SaveImaged; a SupervisedEvaluator whose CheckpointLoader reads
``models/model.pt``. Its ``device`` is hard-coded to ``cuda:0`` as some Zoo bundles are: the
node must override it. ``configs/metadata.json`` names the output channels. The network is
a small ``monai.networks.nets.UNet`` trained for a few whole-volume steps on subject A at
the bundle's 5 mm spacing (a 3 mm series is resampled both ways, and a study needs
several windows), so its labels are blobs where the liver and spleen are, not noise.

:func:`run_reference` runs the bundle's own config with ``python -m monai.bundle run``
(needs ``fire`` and ``pytorch-ignite``, test dependencies) and returns its label map.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Channel -> (structure name, TotalSegmentator 'total' value in labels.nii.gz).
CHANNELS = {1: ("liver", 5), 2: ("spleen", 1)}
#: Not a whole multiple of subject A's 3 mm: MONAI's Spacing rounds an output size that
#: falls on exactly .5 by the float noise of the image's origin, which the node does not
#: see (an axis of 112 slices at 3 mm would be 56.5 voxels at 6 mm).
PIXDIM = [5.0, 5.0, 5.0]
ROI = [32, 32, 32]
TRAIN_STEPS = 40
#: Cross-entropy class weights: background dominates a CT; spleen is small.
CLASS_WEIGHTS = [0.2, 1.0, 2.0]
INTENSITY = {"a_min": -57.0, "a_max": 164.0, "b_min": 0.0, "b_max": 1.0, "clip": True}
NETWORK = {
    "_target_": "UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": len(CHANNELS) + 1,
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 0,
    "norm": "batch",
}

INFERENCE: dict[str, Any] = {
    "imports": ["$import glob", "$import os"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/workspace/data",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": "$torch.device('cuda:0')",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": PIXDIM, "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", **INTENSITY},
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    },
    "dataset": {
        "_target_": "Dataset",
        "data": "$[{'image': i} for i in @datalist]",
        "transform": "@preprocessing",
    },
    "dataloader": {
        "_target_": "DataLoader",
        "dataset": "@dataset",
        "batch_size": 1,
        "shuffle": False,
        "num_workers": 0,
    },
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": ROI,
        "sw_batch_size": 2,
        "overlap": 0.5,
        "mode": "gaussian",
    },
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": False,
                "to_tensor": True,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_dtype": "$np.uint8",
                "resample": False,
                "separate_folder": False,
                "print_log": False,
            },
        ],
    },
    "handlers": [
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
        },
    ],
    "evaluator": {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": False,
    },
    "initialize": ["$monai.utils.set_determinism(seed=0)"],
    "run": ["$@evaluator.run()"],
}

METADATA: dict[str, Any] = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20220324.json",
    "version": "0.3.1",
    "changelog": {"0.3.1": "test fixture built from subject A"},
    "monai_version": "1.6.1",
    "name": "Subject A abdomen (test fixture)",
    "task": "Liver and spleen segmentation",
    "description": "A small UNet trained for a few steps on one CT, for tests only.",
    "authors": "scp-node tests",
    "copyright": "none",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": ROI,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": len(CHANNELS) + 1,
                "spatial_shape": ROI,
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": True,
                "channel_def": {
                    "0": "background",
                    **{str(c): name for c, (name, _t) in CHANNELS.items()},
                },
            }
        },
    },
}


def inference_config() -> dict[str, Any]:
    """A fresh copy of the fixture's ``configs/inference.json`` (tests edit copies)."""
    return copy.deepcopy(INFERENCE)


def _training_data(data: Path) -> tuple[Any, Any]:
    """Subject A as the bundle's preprocessing gives it: (1, x, y, z) RAS at PIXDIM,
    intensities scaled; labels resampled the same way by nearest neighbour."""
    import nibabel as nib
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRange, Spacing

    ct = nib.as_closest_canonical(nib.load(data / "ct-abdomen-a" / "ct.nii.gz"))
    total = nib.as_closest_canonical(nib.load(data / "ct-abdomen-a" / "labels.nii.gz"))
    affine = torch.as_tensor(ct.affine)
    image = MetaTensor(torch.as_tensor(np.asarray(ct.dataobj, dtype=np.float32))[None], affine)
    values = np.asarray(total.dataobj).astype(np.int16)
    ours = np.zeros(values.shape, dtype=np.float32)
    for channel, (_name, total_value) in CHANNELS.items():
        ours[values == total_value] = channel
    labels = MetaTensor(torch.as_tensor(ours)[None], affine)
    image = ScaleIntensityRange(**INTENSITY)(Spacing(pixdim=PIXDIM, mode="bilinear")(image))
    labels = Spacing(pixdim=PIXDIM, mode="nearest")(labels)
    return image.as_tensor().float(), labels.as_tensor().long()


def write_bundle(bundle: Path, config: dict[str, Any] | None = None) -> Path:
    """The bundle's configs under ``bundle`` and untrained weights: enough for reading it,
    in a fraction of a second (tests of what is refused)."""
    import torch
    from monai.networks.nets import UNet

    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    text = json.dumps(INFERENCE if config is None else config, indent=2)
    (bundle / "configs" / "inference.json").write_text(text)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def build(out: Path, data: Path) -> Path:
    """Write the bundle under ``out/subject_a_bundle`` from the shared data; returns it."""
    import torch
    from monai.networks.nets import UNet

    bundle = write_bundle(out / "subject_a_bundle")

    image, labels = _training_data(data)
    # Whole volume per step, padded to the network's downsampling factor (4).
    pad = [(-s) % 4 for s in image.shape[1:]]
    flat = [0, pad[2], 0, pad[1], 0, pad[0]]
    x = torch.nn.functional.pad(image[None], flat)
    y = torch.nn.functional.pad(labels, flat)
    torch.manual_seed(0)
    network = UNet(**{k: v for k, v in NETWORK.items() if k != "_target_"})
    optimiser = torch.optim.Adam(network.parameters(), lr=2e-2)
    weights = torch.tensor(CLASS_WEIGHTS)
    network.train()
    for _step in range(TRAIN_STEPS):
        loss = torch.nn.functional.cross_entropy(network(x), y, weight=weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    network.eval()
    torch.save(network.state_dict(), bundle / "models" / "model.pt")
    return bundle


def run_reference(bundle: Path, image: Path, out: Path) -> Path:
    """Run the bundle's own ``configs/inference.json`` on ``image`` (a NIfTI) on the CPU
    with ``python -m monai.bundle run``; returns the label NIfTI it saves."""
    dataset = out / "in"
    dataset.mkdir(parents=True)
    (dataset / image.name).symlink_to(image)
    output = out / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(dataset),
            "--output_dir",
            str(output),
            # The bundle hard-codes cuda:0, as some Model Zoo bundles do.
            "--device",
            "$torch.device('cpu')",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    saved = sorted(output.glob("*.nii.gz"))
    assert len(saved) == 1, f"expected one label file in {output}: {saved}"
    return saved[0]


if __name__ == "__main__":
    print(build(Path(sys.argv[1]), Path(sys.argv[2])))  # noqa: T201
