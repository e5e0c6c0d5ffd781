"""Benchmark: the node end to end on loopback, side by side with dcmtk's storescp.

Generates a realistic N-slice CT series (subject B's 20 real slices decoded, restacked along z
with fresh UIDs, uncompressed and JPEG 2000 copies), then in one run:

1. receive rate: storescu -> dcmtk `storescp` (reference) vs storescu -> `scp-node serve`,
   interleaved per round, instances/s and the ratio;
2. latency: seconds from the last instance acknowledged to the SEG at a PACS stand-in,
   minus the configured settle wait, and the job's stage durations;
3. peak resident memory (VmHWM) of the `scp-node serve` process.

Run: .venv/bin/python bench/node_e2e.py [--slices 200] [--rounds 3]
Prints a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402
    PacsStub,
    StudyMaker,
    free_port,
    wait_for_port,
    wait_until,
    write_config,
)

SHARED = REPO.parent / "shared" / "data" / "ct-abdomen-b" / "dicom"
SCP_NODE = Path(sys.executable).parent / "scp-node"
ENV = {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, files: list[Path], called: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        env=ENV,
        capture_output=True,
    )
    return time.perf_counter() - started


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quiet-s", type=float, default=2.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="scp-node-bench-"))
    try:
        maker = StudyMaker(sorted(SHARED.glob("*.dcm")))
        rounds = [maker.make(work / f"series{r}", args.slices) for r in range(args.rounds)]
        latency_series = maker.make(work / "latency", args.slices)

        port, pacs_port, ref_port = free_port(), free_port(), free_port()
        node_root = work / "node"
        node_root.mkdir()
        # The settle sweep must not start inference while the receive rounds are measured.
        rates_config = write_config(
            node_root, port, pacs_port, settle={"quiet_s": 3600.0, "poll_s": 0.2}
        )
        ref_dir = work / "storescp"
        ref_dir.mkdir()
        ref = subprocess.Popen(
            ["storescp", "-aet", "REF", "-od", str(ref_dir), "--fork", str(ref_port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        node = subprocess.Popen(
            [str(SCP_NODE), "serve", "--config", str(rates_config)],
            cwd=node_root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(ref_port)
        wait_for_port(port, timeout_s=120)
        ref_rates, node_rates = [], []
        for files in rounds:  # interleaved so both see the same machine state
            ref_rates.append(len(files) / storescu(ref_port, files, "REF"))
            node_rates.append(len(files) / storescu(port, files, "SCPNODE"))
        ref.terminate()
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        ref.wait(timeout=10)

        # Latency: a fresh node with the real settle wait and a PACS stand-in.
        shutil.rmtree(node_root)
        node_root.mkdir()
        config = write_config(
            node_root, port, pacs_port, settle={"quiet_s": args.quiet_s, "poll_s": 0.2}
        )
        pacs = PacsStub(work / "pacs", pacs_port).start()
        node = subprocess.Popen(
            [str(SCP_NODE), "serve", "--config", str(config)],
            cwd=node_root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(port, timeout_s=120)
        storescu(port, latency_series, "SCPNODE")
        acked = time.perf_counter()
        wait_until(lambda: pacs.received, 600, "the SEG at the PACS", poll_s=0.05)
        to_seg = time.perf_counter() - acked
        peak = peak_rss_mib(node.pid)
        jobs = json.loads(
            subprocess.run(
                [str(SCP_NODE), "jobs", "--config", str(config), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        pacs.stop()

        def fmt(rates: list[float]) -> str:
            return f"{np.median(rates):7.1f}  (min {min(rates):.1f}, max {max(rates):.1f})"

        out = sys.stdout
        out.write(
            f"\nscp-node end-to-end benchmark: {args.slices} CT slices 512x512 uncompressed, "
        )
        out.write(f"{args.rounds} interleaved rounds, {os.cpu_count()} CPUs\n\n")
        out.write("| receiver | instances/s (median) | ratio to storescp |\n|---|---|---|\n")
        out.write(f"| dcmtk storescp | {fmt(ref_rates)} | 1.00 |\n")
        ratio = np.median(node_rates) / np.median(ref_rates)
        out.write(f"| scp-node serve | {fmt(node_rates)} | {ratio:.2f} |\n\n")
        out.write(f"last instance acknowledged -> SEG at the PACS: {to_seg:.1f} s ")
        out.write(
            f"(of which settle wait {args.quiet_s:.1f} s: {to_seg - args.quiet_s:.1f} s work)\n"
        )
        durations = jobs[0]["durations"]
        out.write(
            "stage durations (s): " + ", ".join(f"{k} {v:.2f}" for k, v in durations.items()) + "\n"
        )
        out.write(f"peak resident memory of scp-node serve: {peak:.0f} MiB\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
