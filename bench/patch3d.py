"""One sliding-window patch of an nnU-Net 3d_fullres ``PlainConvUNet`` through each CPU
runtime: torch eager, ONNX Runtime fp32 and int8 (QDQ, per-channel; u8 activations with
``reduce_range``, and s8s8), OpenVINO fp32 and OpenVINO running the int8 QDQ file.

The network is TotalSegmentator-fast-shaped (6 stages, widths 32-320, patch 112x112x128,
random weights; ``--stages``/``--width``/``--patch`` change it). Calibration is a few
random-normal patches (nnU-Net's z-scored CT is roughly that); the argmax agreement with
torch fp32 is printed but says little on random weights.

    python bench/patch3d.py --threads 2 --rounds 3

Prints the CPU flags that matter for int8, then seconds per patch (best of ``--rounds``),
the speed-up over torch eager and the argmax agreement.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_summary() -> str:
    from scp_node.inference.verify import cpu_flags

    model, flags = cpu_flags()
    present = [f for f in INT8_FLAGS if f in flags.split()]
    return f"{model}; int8-relevant flags: {' '.join(present) or 'none'}"


def network(stages: int, width: int, classes: int) -> torch.nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    features = [min(320, width * 2**i) for i in range(stages)]
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (stages - 2) + [[1, 1, 2]]
    return PlainConvUNet(
        input_channels=1,
        n_stages=stages,
        features_per_stage=features,
        conv_op=torch.nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * stages,
        strides=strides,
        n_conv_per_stage=[2] * stages,
        num_classes=classes,
        n_conv_per_stage_decoder=[2] * (stages - 1),
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stages", type=int, default=6)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--classes", type=int, default=25)
    parser.add_argument("--patch", type=int, nargs=3, default=[112, 112, 128])
    parser.add_argument("--calibration", type=int, default=4, help="calibration patches")
    args = parser.parse_args()

    from scp_node.inference.runtime.onnx import OnnxNetwork, openvino_available
    from scp_node.training.optimize_volume import INT8_OPS, conv_nodes, export_volume_onnx
    from scp_node.training.quantize import quantize_onnx

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net = network(args.stages, args.width, args.classes)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, *args.patch)).astype(np.float32)
    runners: list[tuple[str, Callable[[], np.ndarray]]] = []

    def torch_run() -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).numpy()

    runners.append(("torch eager fp32", torch_run))
    scratch = Path(tempfile.mkdtemp(prefix="patch3d-"))
    fp32 = scratch / "fp32.onnx"
    export_volume_onnx(net, fp32, (args.patch[0], args.patch[1], args.patch[2]))
    calibration = [
        torch.from_numpy(rng.standard_normal((1, 1, *args.patch)).astype(np.float32))
        for _ in range(args.calibration)
    ]
    # The settings `scp-node model optimize` uses for 3-D networks (see optimize_volume).
    convs = conv_nodes(fp32)
    settings = {"op_types": INT8_OPS, "exclude": convs[:1] + convs[-1:]}
    u8, s8 = scratch / "int8-u8.onnx", scratch / "int8-s8.onnx"
    quantize_onnx(fp32, u8, calibration, reduce_range=True, **settings)  # type: ignore[arg-type]
    quantize_onnx(fp32, s8, calibration, reduce_range=False, activations="s8", **settings)  # type: ignore[arg-type]
    engines = [("ort", fp32, "ORT fp32"), ("ort", u8, "ORT int8 u8s8 reduce_range")]
    engines += [("ort", s8, "ORT int8 s8s8")]
    if openvino_available():
        engines += [("openvino", fp32, "OpenVINO fp32")]
        engines += [("openvino", u8, "OpenVINO int8 (u8s8 QDQ file)")]
    for engine, path, label in engines:
        runner = OnnxNetwork(path, engine=engine, threads=args.threads)  # type: ignore[arg-type]
        runners.append((label, lambda r=runner: r.run(x)))  # type: ignore[misc]
    # Interleaved rounds: load from other processes spreads over every runtime alike.
    outputs = {label: run() for label, run in runners}  # warm-up
    times: dict[str, list[float]] = {label: [] for label, _ in runners}
    for _round in range(args.rounds):
        for label, run in runners:
            started = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - started)
    rows = [(label, min(times[label]), outputs[label]) for label, _ in runners]
    ref = outputs["torch eager fp32"]
    shutil.rmtree(scratch, ignore_errors=True)
    print(cpu_summary())  # noqa: T201
    print(  # noqa: T201
        f"one patch {'x'.join(map(str, args.patch))}, {args.stages} stages, widths "
        f"{args.width}-{min(320, args.width * 2 ** (args.stages - 1))}, {args.classes} classes, "
        f"{args.threads} threads, best of {args.rounds} interleaved rounds"
    )
    print(f"{'runtime':<32} {'s/patch':>8} {'x torch':>8} {'argmax agree':>13}")  # noqa: T201
    base = rows[0][1]
    ref_arg = ref.argmax(1)
    for label, seconds, out in rows:
        agree = float((out.argmax(1) == ref_arg).mean())
        print(f"{label:<32} {seconds:>8.2f} {base / seconds:>8.2f} {agree:>13.4f}")  # noqa: T201


if __name__ == "__main__":
    main()
