"""Benchmark: big CT studies through `scp-node serve` (issue 10).

For each size (default 200, 600 and 1000 slices): a 512x512 uncompressed CT series made of
subject B's 20 real slices, decoded once and restacked 0.5 mm apart under fresh UIDs, is
pushed with dcmtk's storescu into a fresh `scp-node serve` (shipped model, CPU) that sends
its SEG to dcmtk's storescp. Reported per size, in one table:

* peak resident memory of the serve process (VmHWM from /proc), at the end and when the
  last instance was acknowledged (start-up and receiving only),
* seconds per job stage from the job's events (`scp-node jobs show ID --json`): select,
  load, inference (and the network's share of it), SEG build, SEG write, delivery; their
  sum, and seconds from the last instance acknowledged to the SEG at the PACS minus the
  settle wait,
* the SEG's size as the node sent it (BINARY), and BINARY against LABELMAP (JPEG-LS
  lossless) built here, outside the node, by the node's own ``build_segmentation`` from the
  same labels on the same source files: size and build + write seconds of each.

The machine's CPU model and SIMD flags and its load average before and after are printed
under the table: the numbers mean little without them.

Run: .venv/bin/python bench/big_study.py [--sizes 200 600 1000] [--threads 2] [--variant auto]
[--nice 0]
Needs dcmtk (storescu, storescp) on the PATH. Imports no test code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scp_node.dicom.volume import load_volume
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "ct-abdomen-b" / "dicom"
SCP_NODE = Path(sys.executable).parent / "scp-node"
ENV = {**os.environ, "TCP_NODELAY": "1"}
SLICE_MM = 0.5
MODEL = "ct-abdomen"
QUIET_S = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def make_series(out: Path, slices: int) -> list[Path]:
    """``slices`` uncompressed slices of subject B, restacked 0.5 mm apart, fresh UIDs."""
    sources = []
    for path in sorted(SHARED.glob("*.dcm")):
        ds = dcmread(path)
        pixels = ds.pixel_array.astype(np.int16 if ds.PixelRepresentation else np.uint16)
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sources.append(ds)
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    z0 = float(sources[0].ImagePositionPatient[2])
    out.mkdir(parents=True)
    paths = []
    for i in range(slices):
        ds = sources[i % len(sources)].copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], z0 + SLICE_MM * i]
        ds.SliceLocation = z0 + SLICE_MM * i
        ds.SliceThickness = SLICE_MM
        path = out / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_config(
    root: Path,
    ports: tuple[int, int, int],
    threads: int,
    variant: str,
    nice: int | None,
    log_level: str = "WARNING",
) -> Path:
    port, pacs_port, web_port = ports
    sections: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "SCPNODE", "host": "127.0.0.1", "port": port},
        "storage": {"spool_dir": str(root / "spool"), "min_free_bytes": 0},
        "database": {"url": f"sqlite:///{root / 'node.db'}"},
        "settle": {"quiet_s": QUIET_S, "poll_s": 0.2},
        "worker": {
            "device": "cpu",
            "model": MODEL,
            "models_dir": str(REPO / "models"),
            "outbox_dir": str(root / "outbox"),
            "lease_s": 120,
            "heartbeat_s": 5,
            "poll_s": 0.2,
            "threads": threads,
            "variant": variant,
            **({} if nice is None else {"nice": nice}),
        },
        "log": {"level": log_level, "dir": str(root / "log")},
        "web": {"host": "127.0.0.1", "port": web_port},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    lines += ["[[destinations]]", 'name = "pacs"', 'ae_title = "PACS"', 'host = "127.0.0.1"']
    lines.append(f"port = {pacs_port}")
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def seg_types(binary_path: Path, sources: list[Path], work: Path) -> dict[str, dict[str, float]]:
    """BINARY and LABELMAP SEGs of the node's labels, built and written by the node's code.

    The labels are the node's BINARY SEG read back; the volume is the source files loaded
    as the worker loads them. Returns seg type -> {"build_s", "write_s", "bytes"}.
    """
    spec = ModelSpec.from_model_dir(REPO / "models" / MODEL)
    volume = load_volume(sources)
    binary = hd.seg.segread(binary_path)
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    segments = binary.get_pixels_by_source_instance(
        uids, combine_segments=True, relabel=False, dtype=np.uint8
    )
    value_of = {label.name: label.value for label in spec.labels}
    lut = np.zeros(256, dtype=np.uint8)
    for item in binary.SegmentSequence:
        lut[int(item.SegmentNumber)] = value_of[str(item.SegmentLabel)]
    labels = lut[segments]
    del segments, binary
    result: dict[str, dict[str, float]] = {}
    for seg_type in ("BINARY", "LABELMAP"):
        began = time.perf_counter()
        seg = build_segmentation(volume, labels, spec, software_version="bench", seg_type=seg_type)
        built = time.perf_counter()
        assert seg is not None
        path = work / f"{seg_type}.dcm"
        write_segmentation(seg, path)
        result[seg_type] = {
            "build_s": built - began,
            "write_s": time.perf_counter() - built,
            "bytes": path.stat().st_size,
        }
        path.unlink()
    return result


def job_report(config: Path, root: Path, job_id: int) -> dict[str, Any]:
    """``scp-node jobs show ID --json``: the job with its events."""
    out = subprocess.run(
        [str(SCP_NODE), "jobs", "--config", str(config), "show", str(job_id), "--json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
    ).stdout
    report: dict[str, Any] = json.loads(out)
    return report


def stage_data(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Stage -> the data of its events, merged (later events win)."""
    data: dict[str, dict[str, Any]] = {}
    for event in events:
        data.setdefault(event["stage"], {}).update(event.get("data") or {})
    return data


def handoffs(events: list[dict[str, Any]], durations: dict[str, float]) -> dict[str, float]:
    """Seconds between the stages, where the job waits on a poll or a wake-up.

    ``settle``: last instance received -> job queued, beyond the quiet wait; ``claim``:
    queued -> claimed by the worker; ``between``: claimed -> SEG written less the select,
    load, inference and seg stages (preview, measurements, the stage events' own
    commits); ``to_complete``: SEG written (end of the seg stage)
    -> the worker's result recorded (the inference event without a duration);
    ``to_delivery``: result recorded -> its delivery claimed by the dispatcher;
    ``delivered``: delivery claimed -> job done.
    """

    def first_at(stage: str, *, timed: bool | None = None) -> datetime | None:
        found = next(
            (
                e["at"]
                for e in events
                if e["stage"] == stage and (timed is None or (e["duration_s"] is not None) == timed)
            ),
            None,
        )
        return None if found is None else datetime.fromisoformat(found)

    seg, completed = first_at("seg"), first_at("inference", timed=False)
    claimed, done = first_at("deliver"), first_at("done")
    started = first_at("claim")
    staged = sum(float(durations.get(s, math.nan)) for s in ("select", "load", "inference", "seg"))

    def between(start: datetime | None, end: datetime | None) -> float:
        return math.nan if start is None or end is None else (end - start).total_seconds()

    return {
        "settle": float(durations.get("settle_wait", math.nan)) - QUIET_S,
        "claim": float(durations.get("queue_wait", math.nan)),
        "between": between(started, seg) - staged,
        "to_complete": between(seg, completed),
        "to_delivery": between(completed, claimed),
        "delivered": between(claimed, done),
    }


def cpu_summary() -> str:
    """CPU model and the SIMD flags that decide int8 and fp32 kernel speed."""
    model, flags = "unknown CPU", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "amx", "sse4")) or "vnni" in f)
    return f"{model}; flags: {' '.join(simd)}"


def healthy(web_port: int) -> bool:
    """``/healthz`` says ok: receivers, models (variant chosen and verified) and stages run."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=5) as reply:
            return bool(json.loads(reply.read()).get("status") == "ok")
    except (OSError, ValueError):
        return False


def run_size(
    work: Path, slices: int, threads: int, variant: str, nice: int | None, log_level: str
) -> dict[str, Any]:
    files = make_series(work / f"series-{slices}", slices)
    root = work / f"node-{slices}"
    root.mkdir()
    pacs_dir = root / "pacs"
    pacs_dir.mkdir()
    port, pacs_port, web_port = free_port(), free_port(), free_port()
    config = write_config(root, (port, pacs_port, web_port), threads, variant, nice, log_level)
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node = subprocess.Popen(
        [str(SCP_NODE), "serve", "--config", str(config)],
        cwd=root,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port) and port_open(pacs_port), 300, "the node and PACS")
        # Start-up work (choosing and verifying the variant) must not overlap the receive.
        wait_for(lambda: healthy(web_port), 600, "the node to be healthy")
        subprocess.run(
            ["storescu", "-aec", "SCPNODE", "127.0.0.1", str(port), *map(str, files)],
            check=True,
            env=ENV,
            capture_output=True,
        )
        acknowledged = time.monotonic()
        received_peak = peak_rss_mib(node.pid)
        wait_for(lambda: any(pacs_dir.iterdir()), 1800, "the SEG at the PACS")
        latency_s = time.monotonic() - acknowledged - QUIET_S
        peak = peak_rss_mib(node.pid)
        jobs = json.loads(
            subprocess.run(
                [str(SCP_NODE), "jobs", "--config", str(config), "--json"],
                check=True,
                capture_output=True,
                text=True,
                cwd=root,
            ).stdout
        )
        report = job_report(config, root, int(jobs[0]["id"]))
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
        pacs.terminate()
        pacs.wait(timeout=30)
    (seg_file,) = list(pacs_dir.iterdir())
    return {
        "slices": slices,
        "peak_mib": peak,
        "received_peak_mib": received_peak,
        "durations": jobs[0]["durations"],
        "stages": stage_data(report.get("events", [])),
        "handoffs": handoffs(report.get("events", []), jobs[0]["durations"]),
        "latency_s": latency_s,
        "sent_bytes": seg_file.stat().st_size,
        "seg_types": seg_types(seg_file, files, work),
    }


def table(results: list[dict[str, Any]]) -> str:
    """One Markdown table, a row per study size."""
    header = [
        "slices",
        "VmHWM MiB",
        "VmHWM at receive end MiB",
        "select s",
        "load s",
        "inference s",
        "(network s)",
        "SEG build s",
        "SEG write s",
        "delivery s",
        "sum s",
        "ack->SEG-settle s",
        "BINARY MiB",
        "BINARY build+write s",
        "LABELMAP MiB",
        "LABELMAP build+write s",
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in results:
        durations, stages = r["durations"], r["stages"]
        seg = stages.get("seg", {})
        stage_s = [float(durations.get(s, float("nan"))) for s in ("select", "load", "inference")]
        network = float(stages.get("inference", {}).get("stages_s", {}).get("network", math.nan))
        build, write = float(seg.get("build_s", math.nan)), float(seg.get("write_s", math.nan))
        delivery = float(durations.get("delivery", math.nan))
        # The seg stage is build + write + bookkeeping: count it whole in the sum.
        work_s = sum(stage_s) + float(durations.get("seg", math.nan)) + delivery
        kinds = r["seg_types"]
        row = [str(r["slices"]), f"{r['peak_mib']:.0f}", f"{r['received_peak_mib']:.0f}"]
        row += [f"{v:.2f}" for v in (*stage_s, network, build, write, delivery, work_s)]
        row.append(f"{r['latency_s']:.2f}")
        for kind in ("BINARY", "LABELMAP"):
            row.append(f"{kinds[kind]['bytes'] / 2**20:.1f}")
            row.append(f"{kinds[kind]['build_s'] + kinds[kind]['write_s']:.2f}")
        lines.append(" | ".join(row))
    return "\n".join(lines) + "\n"


def inference_table(results: list[dict[str, Any]]) -> str:
    """The slice runtime's own steps per study size (issue 12: the whole predict)."""
    steps = ("prepare", "resample_in", "network", "labels")
    header = ["slices", *(f"{step} s" for step in steps), "ms/slice", "network share"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in results:
        stage_s = r["stages"].get("inference", {}).get("stages_s", {})
        values = [float(stage_s.get(step, math.nan)) for step in steps]
        total = sum(values)
        row = [str(r["slices"]), *(f"{v:.2f}" for v in values)]
        row += [f"{1000 * total / r['slices']:.1f}", f"{values[2] / total:.0%}"]
        lines.append(" | ".join(row))
    return "\n".join(lines) + "\n"


def handoff_table(results: list[dict[str, Any]]) -> str:
    """Waits between stages (polls and wake-ups), and what no stage or hand-off accounts for."""
    header = [
        "slices",
        "settle sweep s",
        "queued->claimed s",
        "worker between stages s",
        "SEG written->result recorded s",
        "result recorded->delivery claimed s",
        "delivery claimed->done s",
    ]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in results:
        h = r["handoffs"]
        keys = ("settle", "claim", "between", "to_complete", "to_delivery", "delivered")
        values = [h[k] for k in keys]
        lines.append(" | ".join([str(r["slices"]), *(f"{v:.3f}" for v in values)]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 600, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variant",
        default="auto",
        help='[worker] variant: "auto" (fastest verified here), "" (the card\'s), or a name',
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=None,
        help="[worker] nice (default: the node's); 0 on a machine shared with other work, "
        "where niced stages wait behind it",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the work folder (series, node folders with their logs) and print its path",
    )
    parser.add_argument("--log-level", default="WARNING", help="[log] level of the node")
    args = parser.parse_args()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="scp-node-big-study-"))
    try:
        results = [
            run_size(work, slices, args.threads, args.variant, args.nice, args.log_level)
            for slices in args.sizes
        ]
    finally:
        if args.keep:
            sys.stderr.write(f"work folder kept: {work}\n")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out = sys.stdout
    out.write(table(results))
    out.write("\nInside inference (the slice runtime's steps):\n\n")
    out.write(inference_table(results))
    out.write("\nHand-offs (from the job's events):\n\n")
    out.write(handoff_table(results))
    sent = ", ".join(f"{r['sent_bytes'] / 2**20:.1f}" for r in results)
    variants = sorted({str(r["stages"].get("inference", {}).get("variant", "?")) for r in results})
    out.write(
        f"\n{cpu_summary()}\n{os.cpu_count()} CPU(s), {args.threads} torch thread(s), "
        f"variant {args.variant or 'card'} -> {', '.join(variants)}; worker nice "
        f"{'default' if args.nice is None else args.nice}; settle wait {QUIET_S} s, "
        f"{SLICE_MM} mm slices, uncompressed 512x512 CT, model {MODEL}; load average "
        f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n"
        "BINARY/LABELMAP columns: the node's build_segmentation run here on the node's "
        "labels (LABELMAP written JPEG-LS lossless); the node itself sent BINARY "
        f"({sent} MiB).\n"
    )


if __name__ == "__main__":
    main()
