"""Benchmark: load on one node. S concurrent senders x N studies each into one
``scp-node serve`` (SQLite, CPU, one worker) that sends every SEG to a PACS stand-in.

Studies are realistic CT series: subject B's 20 real slices decoded and restacked 2 mm apart
under fresh UIDs (uncompressed 512x512, patient data as in the source), ``--slices`` slices
each (12 by default, so the default run stays within a few minutes on 2 CPU cores). Each
sender is a dcmtk ``storescu`` process per study, one study after the other.

While it runs, the job table is sampled every second (queue depth per state, instances
received) together with the node's peak resident memory (VmHWM). At the end every sent
instance must be in the table and the spool, and every study must have exactly one SEG at the
PACS and a done job; failures are printed and the exit status is 1.

Run: .venv/bin/python bench/load.py [--senders 8] [--studies 5] [--slices 12]
Prints tables to stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402
    PacsStub,
    StudyMaker,
    exactly_once_failures,
    free_port,
    sop_of,
    study_of,
    wait_for_port,
    write_config,
)

SHARED = REPO.parent / "shared" / "data" / "ct-abdomen-b" / "dicom"
SCP_NODE = Path(sys.executable).parent / "scp-node"
ENV = {**os.environ, "TCP_NODELAY": "1"}
STATES = ("queued", "running", "delivering", "done", "failed")


def emit(line: str = "") -> None:
    """One line of the report on stdout."""
    sys.stdout.write(line + "\n")


@dataclass
class Sample:
    t_s: float
    instances: int
    jobs: dict[str, int]
    hwm_mib: float


def vm_hwm_mib(pid: int) -> float:
    """Peak resident memory of ``pid`` so far (0 once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def sample(db_url: str, pid: int, t0: float) -> Sample:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            instances = int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())
            rows = conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state"))
            jobs = {str(state): int(n) for state, n in rows}
    finally:
        engine.dispose()
    return Sample(time.monotonic() - t0, instances, jobs, vm_hwm_mib(pid))


def send_study(port: int, files: list[Path], sender: int) -> tuple[float, float, int]:
    """One storescu association for one study: (start, end, exit status)."""
    started = time.monotonic()
    result = subprocess.run(
        ["storescu", "-aet", f"SENDER{sender}", "-aec", "SCPNODE", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        env=ENV,
        capture_output=True,
        text=True,
    )
    return started, time.monotonic(), result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--studies", type=int, default=5, help="studies per sender")
    parser.add_argument("--slices", type=int, default=12, help="slices per study")
    parser.add_argument("--quiet-s", type=float, default=2.0, help="settle.quiet_s")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="scp-node-load-") as tmp:
        root = Path(tmp)
        maker = StudyMaker(sorted(SHARED.glob("*.dcm")))
        studies = {
            (s, n): maker.make(root / "studies" / f"s{s}-{n}", args.slices)
            for s in range(args.senders)
            for n in range(args.studies)
        }
        sent_sops = {sop_of(p) for files in studies.values() for p in files}
        study_uids = {study_of(files[0]) for files in studies.values()}

        port, pacs_port = free_port(), free_port()
        node_root = root / "node"
        node_root.mkdir()
        config = write_config(
            node_root,
            port,
            pacs_port,
            settle={"quiet_s": args.quiet_s, "poll_s": 0.5},
            worker={"threads": 1, "lease_s": 120, "heartbeat_s": 5},
            web={"enabled": False},
        )
        db_url = f"sqlite:///{node_root / 'node.db'}"
        pacs = PacsStub(root / "pacs", pacs_port).start()
        log = (node_root / "stdout.log").open("ab")
        node = subprocess.Popen(
            [str(SCP_NODE), "serve", "--config", str(config)],
            cwd=node_root,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        samples: list[Sample] = []
        failures: list[str] = []
        try:
            wait_for_port(port, timeout_s=180)
            t0 = time.monotonic()
            stop = threading.Event()

            def sampler() -> None:
                while not stop.wait(1.0):
                    samples.append(sample(db_url, node.pid, t0))

            sampling = threading.Thread(target=sampler, daemon=True)
            sampling.start()

            def sender(s: int) -> list[tuple[float, float, int]]:
                return [send_study(port, studies[(s, n)], s) for n in range(args.studies)]

            with ThreadPoolExecutor(args.senders) as pool:
                runs = [r for rs in pool.map(sender, range(args.senders)) for r in rs]
            receive_s = max(end for _, end, _ in runs) - min(start for start, _, _ in runs)
            failures += [f"storescu exit {rc}" for _, _, rc in runs if rc != 0]

            deadline = time.monotonic() + args.timeout_s
            while time.monotonic() < deadline:
                last = sample(db_url, node.pid, t0)
                finished = last.jobs.get("done", 0) + last.jobs.get("failed", 0)
                if finished >= len(studies) and last.instances >= len(sent_sops):
                    break
                time.sleep(1.0)
            total_s = time.monotonic() - t0
            stop.set()
            sampling.join()
            samples.append(sample(db_url, node.pid, t0))
            hwm = max(s.hwm_mib for s in samples)
            failures += exactly_once_failures(db_url, sent_sops, study_uids, pacs)
        finally:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
            log.close()
            pacs.stop()

        n_inst = len(sent_sops)
        emit(
            f"\nload: {args.senders} senders x {args.studies} studies x {args.slices} slices "
            f"= {n_inst} instances, {len(studies)} studies (storescu, uncompressed 512x512; "
            f"scp-node serve, SQLite, CPU, 1 worker thread, settle.quiet_s={args.quiet_s})\n"
        )
        emit(f"| {'metric':<44} | {'value':>12} |")
        emit(f"|{'-' * 46}|{'-' * 14}|")
        rows = [
            ("receive: instances/s (all senders together)", f"{n_inst / receive_s:.1f}"),
            ("receive: wall s (first send to last ack)", f"{receive_s:.1f}"),
            ("end to end: s until every job finished", f"{total_s:.1f}"),
            ("end to end: studies/min", f"{60 * len(studies) / total_s:.1f}"),
            ("end to end: instances/s", f"{n_inst / total_s:.1f}"),
            ("node peak memory VmHWM (MiB)", f"{hwm:.0f}"),
            ("SEGs at the PACS (distinct SOP UIDs)", f"{len(pacs.received)}"),
            ("SEG receipts at the PACS", f"{sum(pacs.received.values())}"),
            ("failures", f"{len(failures)}"),
        ]
        for name, value in rows:
            emit(f"| {name:<44} | {value:>12} |")

        step = max(1, len(samples) // 40)
        emit(
            "\nqueue depth over time (job table sampled every second; every "
            f"{step}. sample shown)\n"
        )
        header = (
            "| t (s) | instances | " + " | ".join(f"{s:>10}" for s in STATES) + " | VmHWM MiB |"
        )
        emit(header)
        emit(
            "|" + "|".join("-" * (len(cell) + 2) for cell in header.strip("| ").split(" | ")) + "|"
        )
        shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
        for s in shown:
            counts = " | ".join(f"{s.jobs.get(state, 0):>10}" for state in STATES)
            emit(f"| {s.t_s:5.0f} | {s.instances:>9} | {counts} | {s.hwm_mib:>9.0f} |")

        if failures:
            emit("\nFAILURES:")
            for failure in failures:
                emit(f"- {failure}")
            return 1
        emit("\nall processed, none lost: every instance in table and spool, one SEG per study")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
