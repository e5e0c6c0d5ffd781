"""Benchmark: big CT studies through `scp-node serve` (issue 10).

For each size (default 200, 600 and 1000 slices): a 512x512 uncompressed CT series made of
subject B's 20 real slices, decoded once and restacked 0.5 mm apart under fresh UIDs, is
pushed with dcmtk's storescu into a fresh `scp-node serve` (shipped model, CPU) that sends
its SEG to dcmtk's storescp. Reported per size, in one table:

* peak resident memory of the serve process (VmHWM from /proc),
* seconds per job stage (select, load, inference, seg, delivery) and their sum, from
  `scp-node jobs --json`,
* seconds from the last instance acknowledged to the SEG at the PACS, minus the settle wait,
* the BINARY SEG's size, and the size of highdicom's LABELMAP SEG of the same labels on the
  same source images (built here, outside the node, from the BINARY SEG read back).

Run: .venv/bin/python bench/big_study.py [--sizes 200 600 1000] [--threads 2]
Needs dcmtk (storescu, storescp) on the PATH. Imports no test code.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "ct-abdomen-b" / "dicom"
SCP_NODE = Path(sys.executable).parent / "scp-node"
ENV = {**os.environ, "TCP_NODELAY": "1"}
SLICE_MM = 0.5
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


def write_config(root: Path, port: int, pacs_port: int, threads: int) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "SCPNODE", "host": "127.0.0.1", "port": port},
        "storage": {"spool_dir": str(root / "spool"), "min_free_bytes": 0},
        "database": {"url": f"sqlite:///{root / 'node.db'}"},
        "settle": {"quiet_s": QUIET_S, "poll_s": 0.2},
        "worker": {
            "device": "cpu",
            "model": "ct-abdomen",
            "models_dir": str(REPO / "models"),
            "outbox_dir": str(root / "outbox"),
            "lease_s": 120,
            "heartbeat_s": 5,
            "poll_s": 0.2,
            "threads": threads,
        },
        "log": {"level": "WARNING", "dir": str(root / "log")},
        "web": {"host": "127.0.0.1", "port": free_port()},
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


def labelmap_seg_bytes(
    binary_path: Path, sources: list[Path], transfer_syntax_uid: str = ExplicitVRLittleEndian
) -> int:
    """Size of highdicom's LABELMAP SEG of the BINARY SEG's labels on the same sources."""
    binary = hd.seg.segread(binary_path)
    headers = [dcmread(p, stop_before_pixels=True) for p in sources]
    uids = [str(ds.SOPInstanceUID) for ds in headers]
    labels = binary.get_pixels_by_source_instance(
        uids, combine_segments=True, relabel=True, dtype=np.uint8
    )
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        segment_descriptions=[
            hd.seg.SegmentDescription.from_dataset(item) for item in binary.SegmentSequence
        ],
        series_instance_uid=generate_uid(),
        series_number=9902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="scp-node bench",
        manufacturer_model_name="bench",
        software_versions="bench",
        device_serial_number="bench",
        omit_empty_frames=False,
        transfer_syntax_uid=transfer_syntax_uid,
    )
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def run_size(work: Path, slices: int, threads: int) -> dict[str, Any]:
    files = make_series(work / f"series-{slices}", slices)
    root = work / f"node-{slices}"
    root.mkdir()
    pacs_dir = root / "pacs"
    pacs_dir.mkdir()
    port, pacs_port = free_port(), free_port()
    config = write_config(root, port, pacs_port, threads)
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
        wait_for(lambda: port_open(port) and port_open(pacs_port), 120, "the node and PACS")
        subprocess.run(
            ["storescu", "-aec", "SCPNODE", "127.0.0.1", str(port), *map(str, files)],
            check=True,
            env=ENV,
            capture_output=True,
        )
        acknowledged = time.monotonic()
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
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=120)
        pacs.terminate()
        pacs.wait(timeout=30)
    (seg_file,) = list(pacs_dir.iterdir())
    durations = jobs[0]["durations"]
    return {
        "slices": slices,
        "peak_mib": peak,
        "durations": durations,
        "latency_s": latency_s,
        "binary_bytes": seg_file.stat().st_size,
        "labelmap_bytes": labelmap_seg_bytes(seg_file, files),
        "labelmap_rle_bytes": labelmap_seg_bytes(seg_file, files, RLELossless),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 600, 1000])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scp-node-big-study-"))
    try:
        results = [run_size(work, slices, args.threads) for slices in args.sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stages = ("select", "load", "inference", "seg", "delivery")
    header = ["slices", "VmHWM MiB", *[f"{s} s" for s in stages], "sum s", "ack->SEG-settle s"]
    header += ["BINARY MiB", "LABELMAP MiB", "LABELMAP RLE MiB"]
    out = sys.stdout
    out.write(" | ".join(header) + "\n")
    out.write(" | ".join("---" for _ in header) + "\n")
    for r in results:
        work_s = sum(float(r["durations"].get(s, 0.0)) for s in stages)
        row = [str(r["slices"]), f"{r['peak_mib']:.0f}"]
        row += [f"{float(r['durations'].get(s, float('nan'))):.2f}" for s in stages]
        row += [f"{work_s:.2f}", f"{r['latency_s']:.2f}"]
        row += [
            f"{r[key] / 2**20:.1f}"
            for key in ("binary_bytes", "labelmap_bytes", "labelmap_rle_bytes")
        ]
        out.write(" | ".join(row) + "\n")
    out.write(
        f"\n{os.cpu_count()} CPU(s), {args.threads} torch thread(s), settle wait {QUIET_S} s, "
        f"{SLICE_MM} mm slices, uncompressed 512x512 CT, model ct-abdomen (card's CPU variant)\n"
    )


if __name__ == "__main__":
    main()
