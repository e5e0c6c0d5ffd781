"""Benchmark: a worker's first job, with and without preparing ahead (issue 14, target 3).

One 200-slice 512x512 uncompressed CT (subject B's 20 real slices restacked 0.5 mm apart,
as in bench/big_study.py) is recorded into a fresh SQLite job table, settled, and run by a
fresh worker process with the shipped model (variant pruned-int8-ov, CPU), either

* ``cold``: as a worker that prepares nothing (its first job loads highdicom's tables,
  compiles the network for the slice size and parses every header), or
* ``prepared``: after the worker's start-up warm-up and its idle read-ahead
  (:meth:`Worker.warm_up`, :meth:`Worker.prepare_for_incoming`), which the node does
  before the settle wait ends.

Each run is its own process (first-job effects are per process), the two kinds
interleaved, so both see the same machine load. Reported: the job's stage seconds (from its
durations and events), claim to result recorded, and the CPU flags and load average.

Run: .venv/bin/python bench/worker_prepare.py [--rounds 2] [--slices 200] [--threads 2]
Imports no test code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = "ct-abdomen"
VARIANT = "pruned-int8-ov"


def run_one(series_dir: Path, work: Path, prepare: bool, threads: int) -> dict[str, Any]:
    """In this process: record, (prepare), settle and run one job; its timings."""
    import pydicom

    from scp_node.app import build_queue
    from scp_node.inference.pool import ModelPool
    from scp_node.inference.predictor import Predictor
    from scp_node.inference.registry import ModelSpec
    from scp_node.queue import InstanceRecord, RetryPolicy, make_engine, upgrade
    from scp_node.worker import Worker, WorkerConfig

    engine = make_engine(f"sqlite:///{work / 'node.db'}")
    upgrade(engine)
    db = build_queue(engine, RetryPolicy(3, 5.0, 60.0, 2.0, 3600.0))

    def load(spec: ModelSpec) -> Predictor:
        predictor = Predictor("cpu", threads=threads)
        predictor.load(spec, variant=VARIANT)
        return predictor

    pool = ModelPool(REPO / "models", [MODEL], load)
    pool.get(MODEL)  # the node loads (and verifies) it at start
    config = WorkerConfig("bench", work / "outbox", (), 600.0, 300.0, "bench", prepare=prepare)
    worker = Worker(db.work, pool, config)
    began = time.perf_counter()
    if prepare:
        worker.warm_up()
    warm_s = time.perf_counter() - began
    for path in sorted(series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        db.intake.record_instance(
            InstanceRecord(
                study_instance_uid=str(ds.StudyInstanceUID),
                series_instance_uid=str(ds.SeriesInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                modality=str(ds.Modality),
                path=str(path),
                size_bytes=path.stat().st_size,
                calling_ae="BENCH",
            )
        )
    began = time.perf_counter()
    if prepare:
        while worker.prepare_for_incoming():
            pass
    read_ahead_s = time.perf_counter() - began
    (job_id,) = db.settling.settle(0.0, [MODEL])
    began = time.perf_counter()
    assert worker.run_once()
    job_s = time.perf_counter() - began
    job = db.views.get(job_id)
    events = db.views.events_after(0, job_id=job_id)
    seg = next((e for e in reversed(events) if e.stage == "seg"), None)
    engine.dispose()
    return {
        "durations": job.durations,
        "seg": dict(seg.data) if seg is not None and seg.data else {},
        "job_s": job_s,
        "warm_s": warm_s,
        "read_ahead_s": read_ahead_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--child", nargs=3, metavar=("SERIES", "WORK", "KIND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        series, work, kind = args.child
        result = run_one(Path(series), Path(work), kind == "prepared", args.threads)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    sys.path.insert(0, str(REPO))
    from bench.big_study import cpu_summary, make_series

    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="scp-node-worker-prepare-"))
    make_series(root / "series", args.slices)
    rows = []
    for round_ in range(args.rounds):
        for kind in ("cold", "prepared"):
            work = root / f"{kind}-{round_}"
            work.mkdir()
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--child",
                    str(root / "series"),
                    str(work),
                    kind,
                ],
                check=True,
                capture_output=True,
                text=True,
                cwd=REPO,
            ).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rows.append((kind, round_ + 1, result, os.getloadavg()[0]))
    header = [
        "kind",
        "round",
        "select s",
        "load s",
        "inference s",
        "SEG build s",
        "SEG write s",
        "seg stage s",
        "claim->result s",
        "prepared ahead s (warm-up + read-ahead)",
        "load avg",
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for kind, round_, r, load in rows:
        d, seg = r["durations"], r["seg"]
        values = [
            d.get("select"),
            d.get("load"),
            d.get("inference"),
            seg.get("build_s"),
            seg.get("write_s"),
            d.get("seg"),
            r["job_s"],
            r["warm_s"] + r["read_ahead_s"],
        ]
        lines.append(
            " | ".join([kind, str(round_), *(f"{float(v):.2f}" for v in values), f"{load:.1f}"])
        )
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.write(
        f"\n{cpu_summary()}; {os.cpu_count()} CPU(s), {args.threads} thread(s), {args.slices} "
        f"slices, variant {VARIANT}; load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )


if __name__ == "__main__":
    main()
