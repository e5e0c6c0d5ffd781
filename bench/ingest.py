"""Benchmark: how fast the node receives, side by side with dcmtk's storescp.

In one run, interleaved per round so that both see the same machine state:

1. one association of ``--slices`` CT slices: storescu -> dcmtk ``storescp`` vs -> the node;
2. ``--senders`` concurrent storescu x ``--per-sender`` slices: -> ``storescp --fork`` vs
   -> the node;
3. the same while the node runs a ``--slices`` job (inference on the shipped model).

For each: instances/s, the ratio to dcmtk, CPU milliseconds per instance (the node's
receivers; storescp with its forked children), how many cores that is, and peak resident
memory. Rows 1 and 2 run against a node whose settle wait is an hour (inference off).
``--receivers 1,2`` benchmarks the node once per ``node.receivers`` value; ``--versus DIR``
also runs the ``scp_node`` of another source tree (e.g. ``git archive`` of the commit before a
change), interleaved with this one, so that before and after share one run.

Run: .venv/bin/python bench/ingest.py [--slices 200] [--senders 4] [--per-sender 50]
     [--rounds 3] [--receivers 1,2] [--versus DIR ...]
Prints the table to stdout.

``--phases`` instead shows where one association's time goes: storescu -> a pynetdicom SCP in
this process whose C-STORE handler does more and more of the node's work (nothing; the check;
the file written and fsynced; its folder fsynced; the node's own handler with the row
committed at ``synchronous=NORMAL`` as the receivers do, and at ``FULL``), side by side with
dcmtk ``storescp``, interleaved per round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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

SCP_NODE = Path(sys.executable).parent / "scp-node"
ENV = {**os.environ, "TCP_NODELAY": "1"}
TICK = os.sysconf("SC_CLK_TCK")


# -- processes and their cost ---------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (every thread's)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def cpu_s(pids: list[int], reaped_of: int | None = None) -> float:
    """CPU seconds (user + system) used so far by ``pids``, plus the reaped children of
    ``reaped_of`` (storescp --fork's finished associations)."""
    total = 0
    for pid in pids:
        try:
            fields = _stat(pid)
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
        if pid == reaped_of:
            total += int(fields[13]) + int(fields[14])
    return total / TICK


def peak_rss_mib(pids: list[int]) -> float:
    """Sum of the peak resident memory (VmHWM) of ``pids``."""
    total = 0.0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += sum(int(x.split()[1]) / 1024 for x in lines if x.startswith("VmHWM:"))
    return total


def storescu(port: int, files: list[Path], called: str, calling: str = "BENCH") -> None:
    subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        check=True,
        env=ENV,
        capture_output=True,
    )


def concurrent_storescu(port: int, batches: list[list[Path]], called: str) -> None:
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", f"BENCH{i}", "-aec", called, "127.0.0.1", str(port)]
            + [str(f) for f in files],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, files in enumerate(batches)
    ]
    for sender in senders:
        if sender.wait() != 0:
            raise RuntimeError("storescu failed")


@dataclass
class Receiver:
    """A receiving peer under measurement: its port, AE title and the processes whose CPU
    counts (``measured``) and whose memory counts (``all_pids``)."""

    name: str
    port: int
    ae_title: str
    measured: Callable[[], list[int]]
    all_pids: Callable[[], list[int]]
    reaped_of: int | None = None
    rates: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)

    def measure(self, row: str, send: Callable[[], int]) -> None:
        pids = self.measured()
        cpu0, started = cpu_s(pids, self.reaped_of), time.perf_counter()
        count = send()
        wall = time.perf_counter() - started
        cpu = cpu_s(pids, self.reaped_of) - cpu0
        self.rates.setdefault(row, []).append(count / wall)
        self.cpu_ms.setdefault(row, []).append(1000 * cpu / count)


def start_storescp(root: Path, fork: bool) -> tuple[subprocess.Popen[bytes], Receiver]:
    port = free_port()
    out = root / f"storescp{'-fork' if fork else ''}"
    out.mkdir()
    process = subprocess.Popen(
        ["storescp", "-aet", "REF", "-od", str(out), *(["--fork"] if fork else []), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    pid = process.pid
    name = "dcmtk storescp --fork" if fork else "dcmtk storescp"
    return process, Receiver(
        name, port, "REF", lambda: [pid, *children(pid)], lambda: [pid], reaped_of=pid
    )


def start_node(
    root: Path,
    pacs_port: int,
    receivers: int | None,
    quiet_s: float,
    code: Path | None = None,
) -> tuple[subprocess.Popen[bytes], Receiver, Path]:
    """A node on a free port; ``code``: run the ``scp_node`` package of that source tree
    instead of the installed one (``--versus``)."""
    port = free_port()
    root.mkdir(parents=True)
    node = {"receivers": receivers} if receivers is not None else {}
    config = write_config(
        root, port, pacs_port, node=node, settle={"quiet_s": quiet_s, "poll_s": 0.2}
    )
    process = subprocess.Popen(
        [str(SCP_NODE), "serve", "--config", str(config)],
        cwd=root,
        env=None if code is None else {**os.environ, "PYTHONPATH": str(code)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout_s=180)
    pid = process.pid

    def receiver_pids() -> list[int]:
        spawned = [
            c for c in children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
        ]
        return spawned or [pid]  # one receiver: the SCP runs in the node's own process

    expected = receivers if receivers is not None else min(os.cpu_count() or 1, 4)
    if expected > 1:  # the port opens with the first receiver: wait for all of them
        wait_until(lambda: len(receiver_pids()) == expected, 180, "the receivers", 0.2)
    label = f"scp-node serve ({receivers or 'default'} receiver{'s' if receivers != 1 else ''})"
    if code is not None:
        label = f"{label} [{code.name}]"
    return (
        process,
        Receiver(label, port, "SCPNODE", receiver_pids, lambda: [pid, *receiver_pids()]),
        root / "node.db",
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def job_states(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {str(s) for (s,) in conn.execute("SELECT state FROM jobs")}


# -- the run --------------------------------------------------------------------------------


def cpu_description() -> tuple[str, str]:
    """The CPU model and its vector instruction flags."""
    model, flags = "unknown", set[str]()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
    return model, " ".join(f for f in wanted if f in flags)


def phases(data: Path, slices: int, rounds: int) -> None:
    """Print where one association's time goes (see the module docstring)."""
    from pynetdicom import evt
    from pynetdicom.events import Event

    from scp_node.dicom.handlers import StoreContext
    from scp_node.dicom.scp import StorageServer, build_storage_ae
    from scp_node.dicom.validate import check_instance
    from scp_node.durable import fsync_dir
    from scp_node.queue.db import make_engine, upgrade
    from scp_node.queue.intake import Intake
    from scp_node.spool import Spool

    steps = ("nothing", "check", "file fsync", "folder fsync")

    def handler(step: str, spool: Spool) -> Callable[[Event], int]:
        def handle(event: Event) -> int:
            data = event.encoded_dataset()
            if step == "nothing":
                return 0
            header = check_instance(data, str(event.request.AffectedSOPInstanceUID))
            if step == "check":
                return 0
            path = spool.store(
                header.study_instance_uid,
                header.series_instance_uid,
                header.sop_instance_uid,
                data,
                sync_dir=False,
            )
            if step == "folder fsync":
                fsync_dir(path.parent)
            return 0

        return handle

    names = ["dcmtk storescp", *steps, "node: + row NORMAL", "node: + row FULL"]
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    work = Path(tempfile.mkdtemp(prefix="scp-node-phases-"))
    try:
        maker = StudyMaker(sorted((data / "ct-abdomen-b" / "dicom").glob("*.dcm")))
        for r in range(rounds):
            for i, name in enumerate(names):
                root = work / f"{r}-{i}"
                files = maker.make(root / "study", slices)
                port = free_port()
                if name == "dcmtk storescp":
                    (root / "out").mkdir()
                    ref = subprocess.Popen(
                        ["storescp", "-od", str(root / "out"), str(port)],
                        env=ENV,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    wait_for_port(port)
                    started = time.perf_counter()
                    storescu(port, files, "REF")
                    rates[name].append(slices / (time.perf_counter() - started))
                    stop(ref)
                    continue
                spool = Spool(root / "spool")
                ae = build_storage_ae("SCPNODE")
                engine = None
                if name.startswith("node"):
                    engine = make_engine(
                        f"sqlite:///{root / 'node.db'}",
                        synchronous="NORMAL" if "NORMAL" in name else "FULL",
                    )
                    upgrade(engine)
                    node = StorageServer(
                        ae, "127.0.0.1", port, StoreContext(spool, Intake(engine), 0)
                    )
                else:
                    plain = ae.start_server(
                        ("127.0.0.1", port),
                        block=False,
                        evt_handlers=[(evt.EVT_C_STORE, handler(name, spool))],
                    )
                wait_for_port(port)
                cpu0, started = time.process_time(), time.perf_counter()
                storescu(port, files, "SCPNODE")
                rates[name].append(slices / (time.perf_counter() - started))
                cpu[name].append(1000 * (time.process_time() - cpu0) / slices)
                if engine is not None:
                    node.stop(5.0)
                    engine.dispose()
                else:
                    plain.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model, flags = cpu_description()
    out = sys.stdout
    out.write(
        f"\nwhere one association's time goes: {slices} CT slices 512x512, {rounds} interleaved "
        f"rounds, {os.cpu_count()} cores, {model} [{flags}], load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n\n"
        "| the C-STORE handler does | instances/s (median) | ratio to dcmtk "
        "| SCP CPU ms/instance |\n|---|---|---|---|\n"
    )
    base = float(np.median(rates["dcmtk storescp"]))
    for name in names:
        rate = float(np.median(rates[name]))
        ms = f"{float(np.median(cpu[name])):.1f}" if cpu[name] else "-"
        label = name if name.startswith(("dcmtk", "node", "nothing")) else f"+ {name}"
        out.write(f"| {label} | {rate:.1f} | {rate / base:.2f} | {ms} |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--per-sender", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--receivers",
        default="",
        help="comma-separated node.receivers values to benchmark (default: the node's own)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="the shared data folder (ct-abdomen-b/dicom is used)",
    )
    parser.add_argument(
        "--versus",
        type=Path,
        nargs="+",
        default=[],
        help="source trees (a checkout's root) whose scp_node to benchmark too, interleaved "
        "with this one: before/after a change in one run",
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="show where one association's time goes instead (see the module docstring)",
    )
    args = parser.parse_args()
    data = args.data if args.data.is_dir() else Path("/work/shared/data")
    if args.phases:
        phases(data, args.slices, args.rounds)
        return
    counts: list[int | None] = [int(v) for v in args.receivers.split(",") if v] or [None]
    # With --versus, every tree runs from its own source, this one included.
    trees: list[Path | None] = [None]
    if args.versus:
        trees = [*(tree.resolve() for tree in args.versus), REPO]
    variants = [(receivers, tree) for receivers in counts for tree in trees]

    work = Path(tempfile.mkdtemp(prefix="scp-node-ingest-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        maker = StudyMaker(sorted((data / "ct-abdomen-b" / "dicom").glob("*.dcm")))
        single = [maker.make(work / f"single{r}", args.slices) for r in range(args.rounds)]
        concurrent = [
            [maker.make(work / f"conc{r}-{s}", args.per_sender) for s in range(args.senders)]
            for r in range(args.rounds)
        ]
        busy_study = maker.make(work / "busy", args.slices)
        pacs = PacsStub(work / "pacs", free_port()).start()

        ref_proc, ref = start_storescp(work, fork=False)
        fork_proc, fork = start_storescp(work, fork=True)
        processes += [ref_proc, fork_proc]
        nodes: list[tuple[Receiver, Path]] = []
        for i, (receivers, tree) in enumerate(variants):
            proc, node, db = start_node(work / f"node{i}", pacs.port, receivers, 3600.0, tree)
            processes.append(proc)
            nodes.append((node, db))

        one, many = "1 association", f"{args.senders} senders"
        for r in range(args.rounds):  # interleaved: every peer sees the same machine state
            ref.measure(one, lambda r=r: _send_one(ref, single[r]))
            for node, _db in nodes:
                node.measure(one, lambda r=r, node=node: _send_one(node, single[r]))
            fork.measure(many, lambda r=r: _send_many(fork, concurrent[r]))
            for node, _db in nodes:
                node.measure(many, lambda r=r, node=node: _send_many(node, concurrent[r]))
        peaks = {node.name: peak_rss_mib(node.all_pids()) for node, _db in nodes}
        peaks[ref.name] = peak_rss_mib(ref.all_pids())
        for proc in processes[2:]:
            stop(proc)
        del processes[2:]

        # Row 3: a node that infers, measured while its job runs.
        busy = f"{args.senders} senders, job running"
        still_running: dict[str, bool] = {}
        for i, (receivers, tree) in enumerate(variants):
            proc, node, db = start_node(work / f"busy{i}", pacs.port, receivers, 0.5, tree)
            processes.append(proc)
            _send_one(node, busy_study)
            wait_until(lambda db=db: "running" in job_states(db), 300, "the job to run", 0.05)
            extra = [
                maker.make(work / f"busy{i}-{s}", args.per_sender) for s in range(args.senders)
            ]
            fork.measure(busy, lambda extra=extra: _send_many(fork, extra))
            node.measure(busy, lambda extra=extra, node=node: _send_many(node, extra))
            still_running[node.name] = "running" in job_states(db)
            for row, values in node.rates.items():
                nodes[i][0].rates.setdefault(row, values)
                nodes[i][0].cpu_ms.setdefault(row, node.cpu_ms[row])
            stop(proc)
            processes.remove(proc)

        model, flags = cpu_description()
        out = sys.stdout
        out.write(
            f"\nscp-node ingest benchmark: CT 512x512 uncompressed, {args.rounds} interleaved "
            f"rounds, {os.cpu_count()} cores, {model} [{flags}], load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n"
        )
        out.write(
            f"rows: {one} = {args.slices} slices; {many} = {args.senders} x "
            f"{args.per_sender} slices at once; {busy} = the same during a {args.slices}-slice "
            "inference job\n\n"
        )
        out.write(
            "| row | receiver | instances/s (median, min-max) | ratio to dcmtk "
            "| CPU ms/instance | cores busy |\n|---|---|---|---|---|---|\n"
        )
        for row, reference in ((one, ref), (many, fork), (busy, fork)):
            base = float(np.median(reference.rates[row]))
            for peer in [reference, *(n for n, _db in nodes)]:
                if row not in peer.rates:
                    continue
                rate = float(np.median(peer.rates[row]))
                cpu = float(np.median(peer.cpu_ms[row]))
                out.write(
                    f"| {row} | {peer.name} | {rate:.1f} ({min(peer.rates[row]):.1f}-"
                    f"{max(peer.rates[row]):.1f}) | {rate / base:.2f} | {cpu:.1f} | "
                    f"{rate * cpu / 1000:.2f} |\n"
                )
        out.write("\npeak resident memory (MiB, node: main process + receivers): ")
        out.write(", ".join(f"{name} {mib:.0f}" for name, mib in peaks.items()) + "\n")
        out.write(
            "job still running when the busy row ended: "
            + ", ".join(f"{name}: {'yes' if yes else 'no'}" for name, yes in still_running.items())
            + "\n"
        )
        pacs.stop()
    finally:
        for proc in processes:
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def _send_one(peer: Receiver, files: list[Path]) -> int:
    storescu(peer.port, files, peer.ae_title)
    return len(files)


def _send_many(peer: Receiver, batches: list[list[Path]]) -> int:
    concurrent_storescu(peer.port, batches, peer.ae_title)
    return sum(len(files) for files in batches)


if __name__ == "__main__":
    main()
