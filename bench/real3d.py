"""A small nnU-Net folder with real weights (liver, spleen), for the 3-D int8 agreement gate.

The fixture folder of the tests is trained for ~10 steps, so its logits are near ties and
any int8 variant flips labels; random TotalSegmentator-shaped weights are no better. This
trains the TotalSegmentator-fast topology (3d_fullres PlainConvUNet, 6 stages, 3 mm, patch
112x112x128) at a quarter of its widths (8-80) on subject A, liver and spleen, for a
bounded number of CPU minutes, so its logits are decisive; then ``scp-node model
optimize`` and the gate say what int8 does to a model with real weights.

    python bench/real3d.py OUT --plans-from FOLDER --minutes 10 --threads 2
    scp-node model optimize OUT/model --calibration OUT/dicom-a
    python bench/model3d.py --model-dir OUT/model --slices 200 --threads 2

``FOLDER`` is an nnU-Net folder planned on subject A (the tests' fixture: its plans hold
subject A's intensity statistics). ``OUT/model`` is the card and nnU-Net folder,
``OUT/dicom-a`` subject A as a DICOM series (calibration; its upper half is held out for
the gate). Subject A is the training subject: the gate measures agreement of a variant
with fp32 on anatomy the model segments decisively, not accuracy (subject B is held out
for that and is 20 slices only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model3d import TRAINER, ts_fast_plans, write_nnunet_folder  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
#: Our label value -> (name, TotalSegmentator 'total' value in subject A's labels).
LABELS = {1: ("liver", 5), 2: ("spleen", 1)}
CROP = (48, 48, 64)


def _plans(template: Path) -> tuple[dict[str, object], dict[str, object]]:
    plans = ts_fast_plans(template, 8, 80)
    dataset = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{name: v for v, (name, _t) in LABELS.items()}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    return plans, dataset


def _subject_a(plans: dict[str, object], dataset: dict[str, object]) -> tuple[object, object]:
    """Subject A preprocessed as the node does (RAS, nnU-Net's normalisation, 3 mm)."""
    import nibabel as nib
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ct = nib.as_closest_canonical(nib.load(SHARED / "ct-abdomen-a" / "ct.nii.gz"))
    total = nib.as_closest_canonical(nib.load(SHARED / "ct-abdomen-a" / "labels.nii.gz"))
    image = np.asarray(ct.dataobj, dtype=np.float32).transpose(2, 1, 0)
    source = np.asarray(total.dataobj).astype(np.int16).transpose(2, 1, 0)
    seg = np.zeros(source.shape, dtype=np.int16)
    for value, (_name, total_value) in LABELS.items():
        seg[source == total_value] = value
    spacing = [float(s) for s in np.abs(np.diag(ct.affine)[:3])[::-1]]
    manager = PlansManager(plans)
    data, seg_pp, _props = DefaultPreprocessor(verbose=False).run_case_npy(
        image[None],
        seg[None],
        {"spacing": spacing},
        manager,
        manager.get_configuration("3d_fullres"),
        dataset,
    )
    return data, seg_pp


def train(out: Path, template: Path, minutes: float, threads: int) -> Path:
    """Train and write ``out/model``; returns the card's folder."""
    import torch
    import torch.nn.functional as F
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    plans, dataset = _plans(template)
    config = plans["configurations"]["3d_fullres"]  # type: ignore[index]
    architecture = config["architecture"]
    network = get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        len(LABELS) + 1,
        deep_supervision=False,
    )
    data, seg = _subject_a(plans, dataset)
    x_all = torch.from_numpy(np.ascontiguousarray(data)).float()
    y_all = torch.from_numpy(np.ascontiguousarray(seg[0])).long().clamp(min=0)  # type: ignore[index]
    pad = [max(0, c - s) for c, s in zip(CROP, x_all.shape[1:], strict=True)]
    flat = [v for p in reversed(pad) for v in (0, p)]
    x_all, y_all = F.pad(x_all, flat), F.pad(y_all, flat)
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    foreground = torch.nonzero(y_all > 0)
    losses: list[float] = []
    started = time.perf_counter()
    network.train()
    while time.perf_counter() - started < minutes * 60:
        xs, ys = [], []
        for _ in range(2):
            # Half the crops centred on an organ voxel, half anywhere (nnU-Net oversamples too).
            if rng.random() < 0.5:
                centre = foreground[int(rng.integers(len(foreground)))].tolist()
                corner = [
                    int(np.clip(c - p // 2, 0, s - p))
                    for c, p, s in zip(centre, CROP, y_all.shape, strict=True)
                ]
            else:
                corner = [
                    int(rng.integers(0, s - p + 1)) for s, p in zip(y_all.shape, CROP, strict=True)
                ]
            window = tuple(slice(c, c + p) for c, p in zip(corner, CROP, strict=True))
            xs.append(x_all[(slice(None), *window)])
            ys.append(y_all[window])
        x, y = torch.stack(xs), torch.stack(ys)
        logits = network(x)
        probabilities = logits.softmax(1)
        one_hot = F.one_hot(y, len(LABELS) + 1).permute(0, 4, 1, 2, 3).float()
        overlap = (probabilities * one_hot).sum((0, 2, 3, 4))
        dice = (2 * overlap + 1) / (probabilities.sum((0, 2, 3, 4)) + one_hot.sum((0, 2, 3, 4)) + 1)
        loss = F.cross_entropy(logits, y) + (1 - dice[1:].mean())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        if len(losses) % 20 == 0:
            print(f"step {len(losses)}: loss {np.mean(losses[-20:]):.3f}", flush=True)  # noqa: T201
    model = out / "model"
    write_nnunet_folder(model / TRAINER, plans, dataset, network)
    (model / "model.toml").write_text(
        f'format = "nnunetv2"\nname = "real3d"\n\n[nnunet]\nfolder = "{TRAINER}"\n'
    )
    print(  # noqa: T201
        f"{len(losses)} steps in {time.perf_counter() - started:.0f} s, "
        f"last 20 losses {np.mean(losses[-20:]):.3f}"
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--plans-from", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from tests.support.nifti_series import write_series

    dicom = args.out / "dicom-a"
    if not dicom.exists():
        write_series(SHARED / "ct-abdomen-a" / "ct.nii.gz", dicom)
    train(args.out, args.plans_from, args.minutes, args.threads)


if __name__ == "__main__":
    main()
