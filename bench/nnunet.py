"""Our volume runtime vs ``nnUNetPredictor`` on the same nnU-Net v2 folder and CT.

Each run is a fresh process (so peak RSS is that run's alone), on the same number of torch
threads, the two implementations interleaved round by round. The CT is subject A resampled
to a clinical grid (512 x 512 at 0.78 mm, ``--slices`` slices 1 mm apart) so the folder's
own resampling does real work.

    python bench/nnunet.py --folder PATH/nnUNetTrainer__nnUNetPlans__3d_fullres \\
        --slices 200 --threads 2 --rounds 2

Prints seconds per study and peak RSS for each, and the ratios ours / nnU-Net.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _make_ct(slices: int, out: Path) -> None:
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    ct = nib.as_closest_canonical(nib.load(SHARED / "ct-abdomen-a" / "ct.nii.gz"))
    data = torch.from_numpy(np.asarray(ct.dataobj, dtype=np.float32).transpose(2, 1, 0).copy())
    resized = F.interpolate(data[None, None], size=(slices, 512, 512), mode="trilinear")[0, 0]
    np.save(out, resized.numpy())


def _child(which: str, folder: Path, ct: Path, threads: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    image = np.load(ct)
    spacing = (1.0, 0.78125, 0.78125)
    started = time.perf_counter()
    if which == "ours":
        from scp_node.inference.formats.nnunetv2 import load_nnunet
        from scp_node.inference.runtime.volume import VolumePredictor

        runtime = VolumePredictor("cpu")
        runtime.load_model(load_nnunet(folder, folder.name.rsplit("__", 1)[-1], (0,)))
        runtime.predict(image, spacing)
    else:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(
            use_mirroring=False,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(folder), (0,), "checkpoint_final.pth")
        predictor.predict_single_npy_array(image[None], {"spacing": list(spacing)})
    print(json.dumps({"seconds": time.perf_counter() - started}))  # noqa: T201


def _run(which: str, folder: Path, ct: Path, threads: int) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--child", which, "--folder", str(folder)]
    command += ["--ct", str(ct), "--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    _pid, status, usage = os.wait4(process.pid, 0)
    assert process.stdout is not None
    output = process.stdout.read()
    if status != 0:
        raise RuntimeError(f"{which} run failed: {output}")
    seconds = float(json.loads(output.strip().splitlines()[-1])["seconds"])
    return seconds, usage.ru_maxrss / 1024  # MiB (ru_maxrss is KiB on Linux)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["ours", "nnunet"])
    parser.add_argument("--ct", type=Path)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.folder, args.ct, args.threads)
        return
    ct = Path(f"/tmp/bench-nnunet-ct-{args.slices}.npy")
    if not ct.exists():
        _make_ct(args.slices, ct)
    results: dict[str, list[tuple[float, float]]] = {"ours": [], "nnunet": []}
    for _round in range(args.rounds):
        for which in ("nnunet", "ours"):
            results[which].append(_run(which, args.folder, ct, args.threads))
    print(f"{args.slices} slices 512x512, {args.threads} threads, {args.rounds} rounds")  # noqa: T201
    print(f"{'runtime':<8} {'s/study (median)':>17} {'peak RSS MiB (max)':>19}")  # noqa: T201
    table = {}
    for which, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        rss = max(r for _, r in runs)
        table[which] = (seconds, rss)
        print(f"{which:<8} {seconds:>17.1f} {rss:>19.0f}")  # noqa: T201
    print(  # noqa: T201
        f"ratio ours/nnunet: time {table['ours'][0] / table['nnunet'][0]:.2f}, "
        f"peak RSS {table['ours'][1] / table['nnunet'][1]:.2f}"
    )


if __name__ == "__main__":
    main()
