"""Benchmark: the model variants of a model folder, side by side, on the CPU (and CUDA).

For every variant of the card (``fp32`` = ``[weights]``, then ``[variants]``), in one run:

1. ms per slice: ``Predictor.predict`` on subject B's real 20-slice 512x512 series (the
   worker's input: resampling, windowing, network, softmax, resampling back, argmax),
   interleaved across variants, ``--rounds`` rounds, median per variant;
2. ms per 200-slice study: one ``predict`` call on B's slices tiled to ``--study-slices``;
3. ratio to ``fp32`` (eager torch) of (1);
4. FLOPs per slice of the network at the model spacing (2 x multiply-accumulates of convs;
   int8 variants do the same operations as their fp32 source, in int8);
5. Dice and HD95 per label on held-out subject B through the worker's path
   (:func:`scp_node.training.evaluate.evaluate_series`: DICOM -> SEG -> highdicom read-back).

On a CUDA machine the fp32 variant is also run with and without autocast.

Run: .venv/bin/python bench/model.py [--model models/ct-abdomen] [--threads 2] [--rounds 5]
Prints a table to stdout.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scp_node.dicom.volume import load_volume  # noqa: E402
from scp_node.inference.predictor import Predictor  # noqa: E402
from scp_node.inference.preprocess import (  # noqa: E402
    normalise,
    resample_inplane,
    resampled_shape,
    stack_context,
)
from scp_node.inference.registry import REFERENCE_VARIANT, ModelSpec  # noqa: E402
from scp_node.training.evaluate import evaluate_series  # noqa: E402
from scp_node.training.prune import count_flops  # noqa: E402
from scp_node.training.variants import load_network, quantize_model  # noqa: E402

SUBJECT_B = REPO.parent / "shared" / "data" / "ct-abdomen-b"


def _flops(spec: ModelSpec, name: str, size: tuple[int, int]) -> int | None:
    """FLOPs/slice of a variant: its own network, or its fp32 source's for exports."""
    weights = spec.variant(name)
    if weights.format == "state_dict":
        return count_flops(load_network(spec, name), *size)
    source = name.split("-int8")[0].removesuffix("-onnx")
    if source != name and (source == REFERENCE_VARIANT or source in spec.variants):
        return _flops(spec, source, size)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "ct-abdomen")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--study-slices", type=int, default=200)
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--no-dice", action="store_true", help="skip the Dice evaluation")
    parser.add_argument(
        "--no-fp32-exports",
        action="store_true",
        help="skip the unpruned ONNX fp32 / int8 rows (built in a temporary copy of the model)",
    )
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if not args.no_fp32_exports:
            # Exports of the unpruned network are measured but not shipped (size).
            model_dir = Path(scratch) / args.model.name
            shutil.copytree(args.model, model_dir)
            quantize_model(model_dir, SUBJECT_B.parent, source=REFERENCE_VARIANT)
        _run(args, model_dir)


def _run(args: argparse.Namespace, model_dir: Path) -> None:
    spec = ModelSpec.from_model_dir(model_dir)
    names = args.variants or [REFERENCE_VARIANT, *spec.variants]
    volume = load_volume(sorted((SUBJECT_B / "dicom").glob("*.dcm")))
    spacing = volume.spacing_zyx
    size = resampled_shape(volume.shape[1:], spacing[1:], spec.input.spacing_mm)
    repeats = -(-args.study_slices // volume.shape[0])
    study = np.concatenate([volume.array] * repeats)[: args.study_slices]

    runs: list[tuple[str, str, Predictor]] = []
    for name in names:
        predictor = Predictor("cpu", threads=args.threads)
        predictor.load(spec, name)
        runs.append((name, "cpu", predictor))
    if torch.cuda.is_available():
        for autocast in ("none", "auto"):
            cuda_spec = spec.model_copy(
                update={"runtime": spec.runtime.model_copy(update={"cuda_autocast": autocast})}
            )
            predictor = Predictor("cuda")
            predictor.load(cuda_spec, REFERENCE_VARIANT)
            runs.append((f"fp32 autocast={autocast}", "cuda", predictor))

    for _label, _device, predictor in runs:  # warm-up: lazy init, allocator, ORT session
        predictor.predict(volume.array[:4], spacing)
    per_slice: dict[str, list[float]] = {label: [] for label, _d, _p in runs}
    for _round in range(args.rounds):
        for label, device, predictor in runs:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            predictor.predict(volume.array, spacing)
            if device == "cuda":
                torch.cuda.synchronize()
            per_slice[label].append(1000 * (time.perf_counter() - started) / volume.shape[0])
    # The network alone on the same slices at the model spacing (no resampling/argmax).
    prepared = torch.from_numpy(
        stack_context(
            normalise(volume.array, spec.input.window_center, spec.input.window_width),
            spec.input.context_slices,
        )
    )
    prepared = resample_inplane(prepared, size, antialias=True)
    per_slice_net: dict[str, list[float]] = {label: [] for label, _d, _p in runs}
    with torch.inference_mode():
        for _round in range(args.rounds):
            for label, device, predictor in runs:
                if device != "cpu":
                    continue
                started = time.perf_counter()
                for batch in torch.split(prepared, predictor.batch_size):
                    predictor.logits(batch)
                per_slice_net[label].append(
                    1000 * (time.perf_counter() - started) / volume.shape[0]
                )
    per_study: dict[str, float] = {}
    for label, _device, predictor in runs:
        started = time.perf_counter()
        predictor.predict(study, spacing)
        per_study[label] = 1000 * (time.perf_counter() - started)

    reference = statistics.median(per_slice[REFERENCE_VARIANT])
    reference_net = statistics.median(per_slice_net[REFERENCE_VARIANT])
    label_names = [label.name for label in spec.labels]
    header = ["variant", "device", "ms/slice", f"ms/{args.study_slices}-slice study", "x fp32"]
    header += ["net ms/slice", "net x fp32"]
    header += ["MFLOPs/slice"]
    if not args.no_dice:
        header += [f"Dice {n}" for n in label_names] + [f"HD95 {n} mm" for n in label_names]
    rows: list[list[str]] = []
    for label, device, _predictor in runs:
        ms = statistics.median(per_slice[label])
        name = label if device == "cpu" else REFERENCE_VARIANT
        flops = _flops(spec, name, size)
        row = [
            label,
            device,
            f"{ms:.1f}",
            f"{per_study[label]:.0f}",
            f"{reference / ms:.2f}",
        ]
        if per_slice_net[label]:
            net_ms = statistics.median(per_slice_net[label])
            row += [f"{net_ms:.1f}", f"{reference_net / net_ms:.2f}"]
        else:
            row += ["-", "-"]
        row += [
            "-" if flops is None else f"{flops / 1e6:.0f}",
        ]
        if not args.no_dice:
            if device == "cpu":
                scores = evaluate_series(
                    model_dir,
                    SUBJECT_B / "dicom",
                    SUBJECT_B / "labels.nii.gz",
                    variant=label,
                    predictor=Predictor("cpu", threads=args.threads),
                )
                row += [f"{scores[f'dice_{n}']:.4f}" for n in label_names]
                row += [f"{scores[f'hd95_mm_{n}']:.1f}" for n in label_names]
            else:
                row += ["-"] * (2 * len(label_names))
        rows.append(row)

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out = sys.stdout
    out.write(
        f"model {spec.name} {spec.version}; subject B {volume.shape[0]} slices "
        f"{volume.shape[1]}x{volume.shape[2]} -> {size[0]}x{size[1]} at the model spacing; "
        f"torch {torch.__version__}, {args.threads} CPU thread(s), {args.rounds} rounds "
        f"interleaved, median; x fp32 = fp32 eager ms / variant ms; ms/slice is the whole "
        f"predict() (resampling, softmax, argmax at 512x512 included), net = network only\n"
    )
    out.write("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "\n")
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + "\n")


if __name__ == "__main__":
    main()
