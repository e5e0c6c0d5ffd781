"""3-D variants side by side: ``nnUNetPredictor`` (fp32, no mirroring: the reference), our
volume runtime in fp32 torch, and every variant ``scp-node model optimize`` recorded in the
card (ONNX Runtime fp32/int8, OpenVINO fp32/int8), on one CT, in one run.

Each run is a fresh process (peak RSS is that run's alone) on the same number of threads.
The CT is subject A resampled to a clinical grid (512 x 512 at 0.78 mm, ``--slices``
slices 1 mm apart), rounded to int16 as the worker's ``load_stack`` hands a CT over (peak
RSS then counts the source as the node holds it). Dice is per label against
``nnUNetPredictor``'s labels (and the worst label against our fp32 torch run), so it
measures the whole predict, not a patch.

    python bench/model3d.py --model-dir DIR --slices 200 --threads 2 --rounds 1

``DIR`` is a ``format = "nnunetv2"`` card (one fold) after ``scp-node model optimize``.
``--make-ts-shaped DIR --plans-from FOLDER`` first writes such a card around a
TotalSegmentator-fast-shaped network (3 mm, patch 112x112x128, widths 32-320, random
weights) using FOLDER's ``dataset.json`` and plans as the template.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
TRAINER = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def ts_fast_plans(template: Path, first_width: int, max_width: int) -> dict[str, Any]:
    """``template``'s ``plans.json`` with one 3d_fullres configuration shaped like
    TotalSegmentator-fast's: PlainConvUNet, 6 stages of widths ``first_width * 2**i`` capped
    at ``max_width``, 3 mm spacing, patch 112x112x128."""
    plans: dict[str, Any] = json.loads((template / "plans.json").read_text())
    config = copy.deepcopy(plans["configurations"]["3d_fullres"])
    kwargs = config["architecture"]["arch_kwargs"]
    stages = 6
    kwargs["n_stages"] = stages
    kwargs["features_per_stage"] = [min(max_width, first_width * 2**i) for i in range(stages)]
    kwargs["kernel_sizes"] = [[3, 3, 3]] * stages
    kwargs["strides"] = [[1, 1, 1]] + [[2, 2, 2]] * (stages - 2) + [[1, 1, 2]]
    kwargs["n_conv_per_stage"] = [2] * stages
    kwargs["n_conv_per_stage_decoder"] = [2] * (stages - 1)
    config["patch_size"] = [112, 112, 128]
    config["spacing"] = [3.0, 3.0, 3.0]
    plans["configurations"] = {"3d_fullres": config}
    return plans


def write_nnunet_folder(folder: Path, plans: Any, dataset: Any, network: Any) -> None:
    """``folder`` as nnU-Net's trainer leaves it for fold 0: ``plans.json``,
    ``dataset.json`` and ``fold_0/checkpoint_final.pth`` holding ``network``'s weights."""
    import torch

    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    checkpoint = {
        "network_weights": network.state_dict(),
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


def make_ts_shaped(out: Path, template: Path) -> None:
    """A card + nnU-Net folder with TotalSegmentator-fast-like 3d_fullres plans."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = ts_fast_plans(template, 32, 320)
    dataset = json.loads((template / "dataset.json").read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        1,
        len(dataset["labels"]),
        deep_supervision=False,
    )
    write_nnunet_folder(out / TRAINER, plans, dataset, network)
    (out / "model.toml").write_text(f'format = "nnunetv2"\n\n[nnunet]\nfolder = "{TRAINER}"\n')


def _make_ct(slices: int, out: Path) -> None:
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    ct = nib.as_closest_canonical(nib.load(SHARED / "ct-abdomen-a" / "ct.nii.gz"))
    data = torch.from_numpy(np.asarray(ct.dataobj, dtype=np.float32).transpose(2, 1, 0).copy())
    resized = F.interpolate(data[None, None], size=(slices, 512, 512), mode="trilinear")[0, 0]
    del data
    np.save(out, torch.round(resized).to(torch.int16).numpy())


class _Timed:
    """Wraps a network and adds up the seconds spent in it (the network share), on the
    wall clock and in CPU time of the process (all threads): on a shared machine the wall
    clock measures the neighbours too, CPU time far less."""

    def __init__(self, network: object) -> None:
        self.network = network
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __call__(self, x: object) -> object:
        started, cpu = time.perf_counter(), time.process_time()
        out = self.network(x)  # type: ignore[operator]
        self.seconds += time.perf_counter() - started
        self.cpu_seconds += time.process_time() - cpu
        return out


def _child(which: str, model_dir: Path, ct: Path, threads: int, labels_out: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    image = np.load(ct)
    spacing = (1.0, 0.78125, 0.78125)
    network_s = network_cpu_s = 0.0
    started = time.perf_counter()
    if which == "nnunet":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from scp_node.inference.registry import ModelSpec
        from scp_node.inference.runtime.volume import orientation_flips

        spec = ModelSpec.from_model_dir(model_dir)
        assert spec.nnunet is not None
        flips = orientation_flips(spec.nnunet.orientation)
        predictor = nnUNetPredictor(
            use_mirroring=False,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(
            str(spec.weights_path), (0,), "checkpoint_final.pth"
        )
        network = predictor.network
        clock = {"seconds": 0.0, "started": 0.0, "cpu_seconds": 0.0, "cpu_started": 0.0}

        def _before(_module: object, _inputs: object) -> None:
            clock["started"], clock["cpu_started"] = time.perf_counter(), time.process_time()

        def _after(_module: object, _inputs: object, _output: object) -> None:
            clock["seconds"] += time.perf_counter() - clock["started"]
            clock["cpu_seconds"] += time.process_time() - clock["cpu_started"]

        network.register_forward_pre_hook(_before)
        network.register_forward_hook(_after)
        # The same orientation our runtime feeds the network (the card's), flipped back.
        oriented = np.ascontiguousarray(np.flip(image, flips)) if flips else image
        # predict_single_npy_array's three steps, timed one by one.
        began = time.perf_counter()
        from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        adapter = PreprocessAdapterFromNpy(
            [oriented[None]],
            [None],
            [{"spacing": list(spacing)}],
            [None],
            predictor.plans_manager,
            predictor.dataset_json,
            predictor.configuration_manager,
            num_threads_in_multithreaded=1,
        )
        case = next(adapter)
        prepared_at = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(case["data"]).cpu()
        ran = time.perf_counter()
        labels = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits,
            predictor.plans_manager,
            predictor.configuration_manager,
            predictor.label_manager,
            case["data_properties"],
        )
        labels = np.flip(labels, flips) if flips else labels
        network_s, network_cpu_s = clock["seconds"], clock["cpu_seconds"]
        stages = {
            "prepare": prepared_at - began,
            "network": ran - prepared_at,
            "resample_out": time.perf_counter() - ran,
        }
    else:
        from scp_node.inference.registry import ModelSpec
        from scp_node.inference.runtime import load_runtime
        from scp_node.inference.runtime.volume import VolumePredictor

        spec = ModelSpec.from_model_dir(model_dir)
        runtime = load_runtime(spec, "cpu", threads, variant=which)
        assert isinstance(runtime, VolumePredictor)
        timed = [_Timed(n) for n in runtime.model.networks]
        runtime.model.networks = tuple(timed)  # type: ignore[assignment]
        labels = runtime.predict(image, spacing)
        network_s = sum(t.seconds for t in timed)
        network_cpu_s = sum(t.cpu_seconds for t in timed)
        stages = dict(runtime.stage_s)
    seconds = time.perf_counter() - started
    np.save(labels_out, np.asarray(labels, dtype=np.uint8))
    result = {"seconds": seconds, "network_s": network_s, "network_cpu_s": network_cpu_s}
    print(json.dumps({**result, "stages": stages}))  # noqa: T201


#: Seconds, network seconds, peak RSS MiB, labels file, stage seconds, network CPU seconds.
Result = tuple[float, float, float, Path, dict[str, float], float]


def _run(which: str, args: argparse.Namespace, ct: Path) -> Result:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    # One file per parent process: two benchmarks may run at once.
    labels = Path(f"/tmp/bench-model3d-{os.getpid()}-{which}.npy")
    command = [sys.executable, __file__, "--child", which, "--model-dir", str(args.model_dir)]
    command += ["--ct", str(ct), "--threads", str(args.threads), "--labels", str(labels)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    _pid, status, usage = os.wait4(process.pid, 0)
    assert process.stdout is not None
    output = process.stdout.read()
    if status != 0:
        raise RuntimeError(f"{which} run failed: {output}")
    result = json.loads(output.strip().splitlines()[-1])
    seconds, stages = result["seconds"], result["stages"]
    rss = usage.ru_maxrss / 1024
    return seconds, result["network_s"], rss, labels, stages, result["network_cpu_s"]


def _dice(a: np.ndarray, b: np.ndarray, values: list[int]) -> list[float]:
    out = []
    for v in values:
        x, y = a == v, b == v
        total = int(x.sum()) + int(y.sum())
        out.append(1.0 if total == 0 else 2.0 * int((x & y).sum()) / total)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="runs to do (nnunet, fp32, variant names)")
    parser.add_argument("--make-ts-shaped", type=Path)
    parser.add_argument("--plans-from", type=Path)
    parser.add_argument("--child")
    parser.add_argument("--ct", type=Path)
    parser.add_argument("--labels", type=Path)
    args = parser.parse_args()
    if args.make_ts_shaped:
        make_ts_shaped(args.make_ts_shaped, args.plans_from)
        return
    if args.child:
        _child(args.child, args.model_dir, args.ct, args.threads, args.labels)
        return
    from scp_node.inference.registry import ModelSpec
    from scp_node.inference.verify import cpu_flags

    spec = ModelSpec.from_model_dir(args.model_dir)
    ct = Path(f"/tmp/bench-nnunet-ct-{args.slices}-int16.npy")
    if not ct.exists():
        _make_ct(args.slices, ct)
    runs = args.only or ["nnunet", "fp32", *spec.variants]
    results: dict[str, list[Result]] = {w: [] for w in runs}
    load_before = os.getloadavg()
    for _round in range(args.rounds):
        for which in runs:
            results[which].append(_run(which, args, ct))
    model, flags = cpu_flags()
    present = " ".join(f for f in INT8_FLAGS if f in flags.split()) or "none"
    values = [label.value for label in spec.labels]
    names = [label.name for label in spec.labels]
    reference = np.load(results[runs[0]][-1][3])
    fp32 = np.load(results["fp32"][-1][3]) if "fp32" in results else reference
    base = statistics.median(r[0] for r in results[runs[0]])
    print(f"CPU: {model}; int8-relevant flags: {present}")  # noqa: T201
    load = " / ".join(f"{x:.1f}" for x in load_before)
    print(f"load average before: {load}; after: {os.getloadavg()[0]:.1f}")  # noqa: T201
    print(  # noqa: T201
        f"{args.slices} slices 512x512, {args.threads} threads, {args.rounds} round(s); "
        f"Dice per label ({', '.join(names)}) vs {runs[0]}; worst label vs fp32 torch"
    )
    header = f"{'run':<10} {'s/study':>8} {'network s':>10} {'net CPU s':>10} {'RSS MiB':>8}"
    header += f" {'x ' + runs[0]:>9}"
    print(header + f" {'Dice per label':<30} {'min vs fp32':>11}")  # noqa: T201
    for which, rows in results.items():
        seconds = statistics.median(r[0] for r in rows)
        network = statistics.median(r[1] for r in rows)
        network_cpu = statistics.median(r[5] for r in rows)
        rss = max(r[2] for r in rows)
        labels = np.load(rows[-1][3])
        dice = _dice(reference, labels, values)
        worst_fp32 = min(_dice(fp32, labels, values))
        net = f"{network:.1f}" if network else "-"
        net_cpu = f"{network_cpu:.1f}" if network_cpu else "-"
        print(  # noqa: T201
            f"{which:<10} {seconds:>8.1f} {net:>10} {net_cpu:>10} {rss:>8.0f} "
            f"{base / seconds:>9.2f} "
            f"{' '.join(f'{d:.3f}' for d in dice):<30} {worst_fp32:>11.3f}"
        )
    print("stages, s (median; load: model loading and the rest outside the stages)")  # noqa: T201
    names_s = ("load", "prepare", "network", "resample_out", "labels")
    print(f"{'run':<10} " + " ".join(f"{n:>12}" for n in names_s))  # noqa: T201
    for which, rows in results.items():
        cells = []
        for name in names_s:
            if name == "load":
                values_s = [r[0] - sum(r[4].values()) for r in rows]
            else:
                values_s = [r[4].get(name, float("nan")) for r in rows]
            cells.append(f"{statistics.median(values_s):>12.1f}")
        print(f"{which:<10} " + " ".join(cells))  # noqa: T201


if __name__ == "__main__":
    main()
