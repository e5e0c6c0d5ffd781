"""Benchmark: the variants of a model folder side by side, on this machine's CPU.

Rows, in one run: fp32 eager (torch), fp32 ONNX Runtime, int8 ONNX Runtime, the same two
files in OpenVINO (when installed), int8 torch FX (all built from the unpruned network in a
temporary copy of the model), then the card's own variants (pruned, its exports and int8
files, ONNX Runtime and OpenVINO). Each variant runs in its own
process, so its peak RSS is its own:

1. ms per slice of the whole ``Predictor.predict`` on subject B's real 20-slice 512x512
   series (``--rounds`` rounds, median), with the per-stage breakdown (windowing/stacking,
   resampling to the model spacing, network, logits -> labels at 512x512);
2. ms per study for ``--study-slices`` (B's slices tiled; default 200 and 500), median of
   ``--rounds`` calls, and for the first size its CPU time and x fp32 eager (wall, CPU);
3. network share of the predict time, x fp32 eager (whole predict). ONNX variants run the
   network one batch ahead of the preparation and labels (a helper thread): their
   ``network`` stage is the time the predictor waited for it (the stages still add up to
   the wall time; the network's own time is hidden partly behind the others);
4. peak RSS of the process (MiB);
5. agreement Dice per label with fp32 eager's label maps on B (and, with ``--agreement
   source``, with the fp32 network each variant was made from);
6. the network's GOP/s (FLOPs of its fp32 source: int8 variants do the same operations in
   int8) as a fraction of this machine's measured fp32 / int8 GEMM peak.

It prints the CPU model and flags (avx2, avx512f, avx512_vnni, avx_vnni, amx) first, and the
load average at the start and the end (wall times on a shared machine follow the load;
the CPU-time columns much less).

``--max-isa avx2`` runs the whole benchmark again in a process whose oneDNN (torch's
convolutions, OpenVINO's CPU plugin), ATen vector code and MKL are capped at AVX2: an
AVX2-only machine's instruction set on this machine's cores (caches, clocks and memory stay
this machine's, so it approximates such a machine; it does not replace measuring one). Not
every engine honours the cap: torch's FX int8 (fbgemm) and ONNX Runtime (MLAS) choose their
kernels from CPUID, so their rows say "no" in the "ISA cap" column. For every OpenVINO row
the convolution kernels OpenVINO compiled are printed, which shows whether the cap held.

Run: .venv/bin/python bench/model.py [--model models/ct-abdomen] [--threads 2] [--rounds 3]
Prints a Markdown table to stdout. Needs only the node's own code (never ``tests/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scp_node.dicom.volume import load_volume  # noqa: E402
from scp_node.inference.predictor import Predictor  # noqa: E402
from scp_node.inference.preprocess import resampled_shape  # noqa: E402
from scp_node.inference.registry import REFERENCE_VARIANT, ModelSpec  # noqa: E402
from scp_node.inference.runtime.onnx import openvino_available  # noqa: E402
from scp_node.inference.verify import cpu_flags, label_dice  # noqa: E402
from scp_node.training.prune import count_flops  # noqa: E402
from scp_node.training.variants import load_network, quantize_model, write_variant  # noqa: E402

SUBJECT_B = REPO.parent / "shared" / "data" / "ct-abdomen-b"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
#: Environment that caps oneDNN (torch, OpenVINO), ATen and MKL at an instruction set.
ISA_CAPS = {
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }
}
STAGES = ("prepare", "resample_in", "network", "labels")


# -- one variant, in a child process ----------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    """Time one variant; write its figures (JSON) and label maps (npz) to ``args.out``."""
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    spec = ModelSpec.from_model_dir(args.model_dir)
    volume = load_volume(sorted((SUBJECT_B / "dicom").glob("*.dcm")))
    spacing = volume.spacing_zyx
    predictor = Predictor("cpu", threads=args.threads)
    predictor.load(spec, args.child)
    # Warm-up on the whole series: lazy init, ORT session, OpenVINO compiling per shape.
    predictor.predict(volume.array, spacing)
    predictor.stage_s = dict.fromkeys(STAGES, 0.0)
    per_slice: list[float] = []
    cpu_per_slice: list[float] = []
    labels = np.empty(0)
    for _round in range(args.rounds):
        started, cpu_started = time.perf_counter(), time.process_time()
        labels = predictor.predict(volume.array, spacing)
        per_slice.append(1000 * (time.perf_counter() - started) / volume.shape[0])
        cpu_per_slice.append(1000 * (time.process_time() - cpu_started) / volume.shape[0])
    spent = dict(predictor.stage_s)
    total_stage = sum(spent.values())
    stages = {k: 1000 * v / (args.rounds * volume.shape[0]) for k, v in spent.items()}
    studies: dict[str, float] = {}
    cpu_studies: dict[str, float] = {}
    for slices in args.study_slices:
        repeats = -(-slices // volume.shape[0])
        study = np.concatenate([volume.array] * repeats)[:slices]
        walls, cpus = [], []
        for _round in range(args.rounds):
            started, cpu_started = time.perf_counter(), time.process_time()
            predictor.predict(study, spacing)
            walls.append(1000 * (time.perf_counter() - started))
            cpus.append(1000 * (time.process_time() - cpu_started))
        studies[str(slices)] = statistics.median(walls)
        cpu_studies[str(slices)] = statistics.median(cpus)
        del study
    figures = {
        "ms_per_slice": statistics.median(per_slice),
        "cpu_ms_per_slice": statistics.median(cpu_per_slice),
        "stages_ms_per_slice": stages,
        "network_share": spent["network"] / total_stage if total_stage else None,
        "ms_per_study": studies,
        "cpu_ms_per_study": cpu_studies,
        "peak_rss_mib": _peak_rss_mib(),
    }
    out = Path(args.out)
    np.savez_compressed(out.with_suffix(".npz"), labels=labels)
    out.write_text(json.dumps(figures))


def _peak_rss_mib() -> float:
    """This process's peak RSS (``VmHWM``): unlike ``ru_maxrss``, which survives
    ``execve`` and so would report the parent's peak (the parent quantises the fp32
    network before it starts the children), it starts afresh in each child."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the machine ----------------------------------------------------------------------------


def gemm_peaks(threads: int, size: int = 1536, rounds: int = 10) -> tuple[float, float]:
    """Measured fp32 (torch.mm) and int8 (torch quantized linear, x86 engine) GOP/s."""
    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    ops = 2.0 * size**3

    def best(run: Any) -> float:
        run()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return ops / min(times) / 1e9

    fp32 = best(lambda: torch.mm(a, b))
    torch.backends.quantized.engine = "x86"
    # torch 2.13 deprecates quantized tensors; its quantized linear is still the x86
    # engine's u8s8 GEMM the FX int8 variants run on.
    warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
    qa = torch.quantize_per_tensor(a.abs(), 0.05, 0, torch.quint8)
    qb = torch.quantize_per_tensor(b, 0.05, 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qb, None)
    int8 = best(lambda: torch.ops.quantized.linear(qa, packed, 0.1, 0))
    return fp32, int8


# -- the parent -----------------------------------------------------------------------------


def _source(spec: ModelSpec, name: str) -> str:
    """The fp32 network a variant was made from (card ``source``, else by its name)."""
    weights = spec.variant(name)
    if weights.source is not None or weights.format == "state_dict":
        return spec.reference_of(name)
    stem = name.split("-int8")[0].removesuffix("-onnx")
    return stem if stem == REFERENCE_VARIANT or stem in spec.variants else REFERENCE_VARIANT


def _flops(spec: ModelSpec, name: str, size: tuple[int, int]) -> int:
    return count_flops(load_network(spec, _source(spec, name)), *size)


def _honours_isa_cap(spec: ModelSpec, name: str) -> str:
    """Whether a variant's engine obeys ``ISA_CAPS`` (oneDNN-based engines do)."""
    weights = spec.variant(name)
    if weights.format == "onnx":
        return "yes" if weights.engine == "openvino" else "no (MLAS)"
    if weights.precision == "int8":
        return "no (fbgemm)"
    return "yes"


def openvino_conv_kernels(path: Path, shape: tuple[int, ...]) -> str:
    """The kernels OpenVINO's CPU plugin compiles for the convolutions of an ONNX file."""
    import openvino as ov

    core = ov.Core()
    network = core.read_model(str(path))
    network.reshape(list(shape))
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}  # as the node
    compiled = core.compile_model(network, "CPU", config)
    kinds: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = {key: value.astype(str) for key, value in op.get_rt_info().items()}
        if info.get("layerType") in ("Convolution", "GroupConvolution", "Deconvolution"):
            kind = info.get("primitiveType", "?")
            kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{kind} x{count}" for kind, count in sorted(kinds.items()))


def _row_label(spec: ModelSpec, name: str) -> str:
    weights = spec.variant(name)
    runtime = {"state_dict": "eager", "torchscript": "FX", "onnx": "ORT"}[weights.format]
    if weights.format == "onnx" and weights.engine == "openvino":
        runtime = "OpenVINO"
    return f"{name} ({weights.precision} {runtime})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "ct-abdomen")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--study-slices", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument(
        "--no-fp32-exports",
        action="store_true",
        help="skip the unpruned ONNX fp32 / int8 and FX int8 rows (built in a temporary copy)",
    )
    parser.add_argument(
        "--max-isa",
        choices=sorted(ISA_CAPS),
        help="cap oneDNN/ATen/MKL at this instruction set (emulates an AVX2-only CPU's ISA)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.max_isa and any(os.environ.get(k) != v for k, v in ISA_CAPS[args.max_isa].items()):
        # The libraries read the cap once, when they load: start afresh with it set.
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | ISA_CAPS[args.max_isa])
    if args.child:
        _child(args)
        return
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if not args.no_fp32_exports:
            # Exports of the unpruned network are measured but not shipped (size).
            model_dir = Path(scratch) / args.model.name
            shutil.copytree(args.model, model_dir)
            torch.set_num_threads(args.threads)
            quantize_model(model_dir, SUBJECT_B.parent, source=REFERENCE_VARIANT)
            if openvino_available():
                _openvino_rows(model_dir, ("fp32-onnx", "fp32-int8-ort"))
        _run(args, model_dir, Path(scratch))


def _openvino_rows(model_dir: Path, names: tuple[str, ...]) -> None:
    """Record OpenVINO twins (``-ort``/``-onnx`` -> ``-ov``) of ONNX Runtime variants."""
    spec = ModelSpec.from_model_dir(model_dir)
    for name in names:
        twin = name.removesuffix("-onnx").removesuffix("-ort") + "-ov"
        weights = spec.variant(name).model_copy(update={"engine": "openvino"})
        write_variant(model_dir, twin, weights)


def _run(args: argparse.Namespace, model_dir: Path, scratch: Path) -> None:
    spec = ModelSpec.from_model_dir(model_dir)
    names = args.variants or [REFERENCE_VARIANT, *spec.variants]
    first = ["fp32", "fp32-onnx", "fp32-ov", "fp32-int8-ort", "fp32-int8-ov", "fp32-int8-fx"]
    order = {n: i for i, n in enumerate(first)}
    names.sort(key=lambda n: order.get(n, len(order)))
    volume = load_volume(sorted((SUBJECT_B / "dicom").glob("*.dcm")))
    size = resampled_shape(volume.shape[1:], volume.spacing_zyx[1:], spec.input.spacing_mm)

    model, flags = cpu_flags()
    present = [f for f in FLAGS if f in flags.split()]
    load_before = os.getloadavg()
    fp32_peak, int8_peak = gemm_peaks(args.threads)
    results: dict[str, dict[str, Any]] = {}
    labels: dict[str, np.ndarray] = {}
    for name in names:
        out = scratch / f"{name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", name]
        command += ["--model-dir", str(model_dir), "--out", str(out)]
        command += ["--threads", str(args.threads), "--rounds", str(args.rounds)]
        command += ["--study-slices", *map(str, args.study_slices)]
        subprocess.run(command, check=True)
        results[name] = json.loads(out.read_text())
        with np.load(out.with_suffix(".npz")) as data:
            labels[name] = data["labels"]

    classes = len(spec.labels) + 1
    lut = {label.value: k for k, label in enumerate(spec.labels, start=1)}

    def indices(array: np.ndarray) -> np.ndarray:
        mapped = np.zeros(array.shape, dtype=np.int32)
        for value, k in lut.items():
            mapped[array == value] = k
        return mapped

    reference_ms = results[REFERENCE_VARIANT]["ms_per_slice"] if "fp32" in results else None
    reference_cpu = results[REFERENCE_VARIANT]["cpu_ms_per_slice"] if "fp32" in results else None
    label_names = [label.name for label in spec.labels]
    studies = [str(s) for s in args.study_slices]
    first = studies[0] if studies else None
    header = ["variant", "ms/slice", *[f"ms/{s}-slice study" for s in studies], "x fp32"]
    if first is not None:
        header += [f"x fp32 {first}-slice study", f"CPU ms/{first}-slice study"]
        header += [f"x fp32 CPU {first}-slice study"]
    header += ["CPU ms/slice", "x fp32 CPU"]
    header += ["prepare", "resample in", "network", "labels", "network share"]
    header += ["peak RSS MiB", "GOP/s", "% of peak", "ISA cap"]
    header += [f"agreement Dice {n} vs fp32" for n in label_names]
    header += [f"agreement Dice {n} vs source" for n in label_names]
    rows = []
    for name in names:
        figures = results[name]
        stage = figures["stages_ms_per_slice"]
        flops = _flops(spec, name, size)
        gops = flops / (stage["network"] / 1000) / 1e9 if stage["network"] else 0.0
        peak = int8_peak if spec.variant(name).precision == "int8" else fp32_peak
        row = [_row_label(spec, name), f"{figures['ms_per_slice']:.1f}"]
        row += [f"{figures['ms_per_study'][s]:.0f}" for s in studies]
        row.append(f"{reference_ms / figures['ms_per_slice']:.2f}" if reference_ms else "-")
        if first is not None:
            fp32_study = results.get(REFERENCE_VARIANT, {}).get("ms_per_study", {}).get(first)
            fp32_cpu = results.get(REFERENCE_VARIANT, {}).get("cpu_ms_per_study", {}).get(first)
            wall, cpu = figures["ms_per_study"][first], figures["cpu_ms_per_study"][first]
            row.append(f"{fp32_study / wall:.2f}" if fp32_study else "-")
            row += [f"{cpu:.0f}", f"{fp32_cpu / cpu:.2f}" if fp32_cpu else "-"]
        row.append(f"{figures['cpu_ms_per_slice']:.1f}")
        row.append(f"{reference_cpu / figures['cpu_ms_per_slice']:.2f}" if reference_cpu else "-")
        row += [f"{stage[k]:.1f}" for k in STAGES]
        row.append(f"{100 * (figures['network_share'] or 0):.0f}%")
        row += [f"{figures['peak_rss_mib']:.0f}", f"{gops:.1f}", f"{100 * gops / peak:.0f}%"]
        row.append(_honours_isa_cap(spec, name) if args.max_isa else "-")
        for reference in (REFERENCE_VARIANT, _source(spec, name)):
            if reference in labels:
                dice = label_dice(indices(labels[reference]), indices(labels[name]), classes)
                row += [f"{d:.4f}" for d in dice]
            else:
                row += ["-"] * len(label_names)
        rows.append(row)

    out = sys.stdout
    out.write(f"CPU: {model}; flags: {', '.join(present) or 'none of ' + ', '.join(FLAGS)}\n")
    out.write(
        f"GEMM peak ({args.threads} threads, 1536^3, best of 10): "
        f"fp32 {fp32_peak:.1f} GOP/s (torch.mm), "
        f"int8 {int8_peak:.1f} GOP/s (torch quantized linear, x86 engine)\n"
    )
    out.write(
        f"model {spec.name} {spec.version}; subject B {volume.shape[0]} slices "
        f"{volume.shape[1]}x{volume.shape[2]} -> {size[0]}x{size[1]} at the model spacing; "
        f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds, median; "
        f"stage columns in ms/slice; x fp32 = fp32 eager / variant (whole predict); "
        f"CPU ms = process CPU time (all threads; steadier than wall time on a shared "
        f"machine); "
        f"GOP/s = the network's fp32-source FLOPs / network time\n\n"
    )
    if args.max_isa:
        out.write(
            f"ISA capped at {args.max_isa} ("
            + ", ".join(f"{k}={v}" for k, v in ISA_CAPS[args.max_isa].items())
            + "): the int8 GEMM peak (fbgemm) and the rows marked 'no' are not capped\n"
        )
    for name in names:
        weights = spec.variant(name)
        if weights.format == "onnx" and weights.engine == "openvino":
            # The slice size the predictor pads to for this variant, as the node compiles it.
            padded = [n + (-n) % weights.pad_multiple for n in size]
            shape = (4, 1 + 2 * spec.input.context_slices, *padded)
            kernels = openvino_conv_kernels(model_dir / weights.file, shape)
            out.write(f"OpenVINO convolution kernels of {name}: {kernels}\n")
    load_after = os.getloadavg()
    out.write(
        "load average (1, 5, 15 min) at start "
        + ", ".join(f"{v:.2f}" for v in load_before)
        + "; at end "
        + ", ".join(f"{v:.2f}" for v in load_after)
        + f" ({os.cpu_count()} CPUs)\n\n"
    )
    out.write("| " + " | ".join(header) + " |\n")
    out.write("|" + "---|" * len(header) + "\n")
    for row in rows:
        out.write("| " + " | ".join(row) + " |\n")


if __name__ == "__main__":
    main()
