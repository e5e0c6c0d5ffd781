"""The worker: claim a job -> select series -> volume -> predict -> SEG (and the SR, LABELMAP
SEG the destinations want) in the outbox -> hand over to dispatch. Every step is timed into
the job's events; the lease is renewed by a heartbeat thread while the job runs."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from scp_node.dicom.frames import HeaderCache
from scp_node.dicom.reference import InstanceReference
from scp_node.dicom.selection import choose_stack
from scp_node.dicom.volume import SourceVolume, describe, load_stack, read_series, read_stacks
from scp_node.durable import write_durably
from scp_node.errors import (
    JobLeaseLostError,
    ModelError,
    OverlayError,
    SegmentationError,
    SeriesError,
)
from scp_node.inference.pool import LoadedModel, ModelPool
from scp_node.inference.postprocess import keep_largest_components
from scp_node.inference.registry import ModelSpec
from scp_node.inference.runtime.geometry import axis_directions
from scp_node.output.kos import build_rejection_note, write_rejection_note
from scp_node.output.overlay import build_overlay_series
from scp_node.output.preview import preview_path_for, render_preview, write_preview
from scp_node.output.seg import build_segmentation, write_segmentation
from scp_node.output.sr import (
    SegmentMeasurement,
    build_measurement_report,
    measure_segments,
    write_measurement_report,
)
from scp_node.output.uids import output_uids
from scp_node.queue.models import DeliveryKind, JobState, Level, Outcome, Stage
from scp_node.queue.records import (
    ClaimedJob,
    DeliveryTarget,
    OutputObject,
    RejectionNote,
    SegVersion,
    Supersession,
)
from scp_node.queue.versions import newest_held
from scp_node.queue.work import WorkQueue
from scp_node.stage_loop import run_stage

logger = logging.getLogger(__name__)
#: SeriesNumber of the overlay series (SEG 9901, KOS 9902, SR 9903).
_SC_SERIES_NUMBER = 9904
#: Incoming series whose geometry the worker has looked at (bounds its memory).
_INSPECTED_SERIES = 1000
#: Headers read ahead per idle round: a job queued meanwhile waits at most this many reads.
_READ_AHEAD = 32
#: Headers held read ahead: about 50 KiB each as pydicom datasets (CT), 100 MiB at most;
#: a job takes its own (its stack keeps them anyway), the oldest go first beyond this.
_HEADERS_HELD = 2000


@dataclass(frozen=True)
class WorkerConfig:
    """Runtime settings of one worker."""

    owner: str
    outbox_dir: Path
    destinations: tuple[DeliveryTarget, ...]
    lease_s: float
    heartbeat_s: float
    software_version: str
    #: Prepare ahead of the jobs: run the per-job code once at start (SEG build and write,
    #: preview, measurements on a tiny synthetic series) and, while idle, ready each slice
    #: model for the image size of the series arriving (OpenVINO compiles per size).
    prepare: bool = False
    #: With ``prepare``, also read the headers of arriving instances while idle. Off when a
    #: receiver shares this process: pydicom's parsing holds the GIL that pynetdicom's
    #: threads need, and receiving keeps priority over the work.
    read_ahead: bool = True


class _ModelDownError(Exception):
    """The job's model could not be loaded on this worker (it is now marked down)."""


class _Heartbeat:
    """Renews a job's lease every ``interval_s`` until stopped; remembers a lost lease."""

    def __init__(self, jobs: WorkQueue, job: ClaimedJob, lease_s: float, interval_s: float) -> None:
        self._jobs, self._job, self._lease_s, self._interval_s = jobs, job, lease_s, interval_s
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._jobs.heartbeat(self._job.id, self._job.token, self._lease_s)
            except JobLeaseLostError:
                self.lost = True
                return
            except Exception:
                logger.warning("heartbeat failed", exc_info=True, extra={"job_id": self._job.id})

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """Runs the jobs of the models in its pool (only theirs: it claims by model)."""

    def __init__(
        self,
        jobs: WorkQueue,
        pool: ModelPool,
        config: WorkerConfig,
        *,
        wake_dispatch: threading.Event | None = None,
    ) -> None:
        self.jobs = jobs
        self.pool = pool
        self.config = config
        self._wake_dispatch = wake_dispatch
        #: Headers of arriving instances, read ahead while idle (``config.prepare``).
        self.headers = HeaderCache(_HEADERS_HELD)
        self._read_after = 0
        #: Incoming series looked at, and (model, rows, columns, pixel spacing) run once.
        self._inspected: OrderedDict[str, None] = OrderedDict()
        self._ready_for: set[tuple[str, int, int, float, float]] = set()

    def run(
        self, stop: threading.Event, poll_s: float = 1.0, wake: threading.Event | None = None
    ) -> None:
        """Process jobs until ``stop`` is set. With the queue empty it waits ``poll_s``, or
        less when ``wake`` is set (the settle sweep in the same process made a job)."""
        logger.info(
            "worker started",
            extra={"owner": self.config.owner, "models": ",".join(self.pool.served)},
        )
        if self.config.prepare:
            self.warm_up()
        run_stage("work", self.run_once, stop, poll_s, wake)
        logger.info("worker stopped", extra={"owner": self.config.owner})

    def run_once(self) -> bool:
        """Claim and process one job; False when there was none (with ``config.prepare``
        the worker then reads ahead for the studies arriving: True while it did)."""
        served = self.pool.served
        if not served:
            return False
        job = self.jobs.claim(self.config.owner, self.config.lease_s, served)
        if job is None:
            # Reading ahead counts as work: the loop comes back at once, claiming first.
            return self.config.prepare and self.config.read_ahead and self.prepare_for_incoming()
        with _Heartbeat(self.jobs, job, self.config.lease_s, self.config.heartbeat_s) as beat:
            try:
                self._process(job)
            except JobLeaseLostError:
                logger.warning("lease lost; result dropped", extra={"job_id": job.id})
            except _ModelDownError as exc:
                self._fail(job, str(exc), retryable=True)
            except (SeriesError, ModelError) as exc:
                self._fail(job, str(exc), retryable=False)
            except Exception as exc:
                logger.exception("job failed", extra={"job_id": job.id})
                self._fail(job, f"{type(exc).__name__}: {exc}", retryable=True)
        if beat.lost:
            logger.warning("lease was lost while the job ran", extra={"job_id": job.id})
        return True

    def warm_up(self) -> None:
        """Run a job's code after the network once, on a tiny synthetic CT series.

        The first SEG a process builds loads highdicom's IOD tables and pydicom's code
        dictionaries (0.5 s on a quiet 2-core EPYC, more under load); the first preview,
        measurement and durable write import and initialise their own parts. Paid here,
        at start, not by the first study. A failure is logged, never fatal: the first job
        then pays it.
        """
        specs = [spec for spec in self.pool.specs.values() if spec.labels]
        if not specs:
            return
        spec = specs[0]
        began = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="scp-node-warm-up-") as tmp:
                folder = Path(tmp)
                paths = _synthetic_series(folder)
                volume = load_stack(read_series(paths)[0])
                labelmap = np.zeros(volume.shape, dtype=np.uint8)
                labelmap[:, 1:3, 1:3] = spec.labels[0].value
                render_preview(volume.array, labelmap, spec.labels, window=_display_window(spec))
                measure_segments(volume, labelmap, spec)
                seg_types = {"binary", *(d.seg_type for d in self.config.destinations)}
                for seg_type in sorted(seg_types):
                    seg = build_segmentation(
                        volume.without_pixels(),
                        labelmap,
                        spec,
                        software_version=self.config.software_version,
                        seg_type=seg_type,
                    )
                    if seg is not None:
                        write_segmentation(seg, folder / f"{seg_type}.dcm")
        except Exception:
            logger.warning("warm-up failed; the first job pays it", exc_info=True)
            return
        logger.info("worker warmed up in %.2f s", time.perf_counter() - began)

    def prepare_for_incoming(self) -> bool:
        """Read ahead for the studies arriving or settling; True when there was some.

        Reads the headers of up to :data:`_READ_AHEAD` newly received instances of a
        modality a served model takes into :attr:`headers` (a job's series selection then
        finds them parsed), and readies each loaded slice model for the image size of
        each new series: OpenVINO compiles a graph per input size on its first use (about
        a second), so one batch of zeros of that series' rows, columns and pixel spacing
        runs through the model now, once per size. Only models already loaded are used
        (loading one could evict another). Never raises: what cannot be read here is
        read, or refused, by the job.
        """
        try:
            incoming = self.jobs.incoming_instances(self._read_after, _READ_AHEAD)
        except Exception:
            logger.debug("incoming instances not read", exc_info=True)
            return False
        if not incoming:
            return False
        self._read_after = incoming[-1].id
        modalities = {m for spec in self.pool.specs.values() for m in spec.series.modalities}
        loaded = [
            self.pool.specs[name]
            for name in self.pool.loaded
            if name in self.pool.specs and self.pool.specs[name].kind == "slice"
        ]
        for instance in incoming:
            if instance.modality not in modalities:
                continue  # no model here takes it: its job (if any) reads it
            header = self.headers.read_ahead(instance.path)
            uid = instance.series_instance_uid
            if header is None or uid in self._inspected:
                continue
            self._inspected[uid] = None
            while len(self._inspected) > _INSPECTED_SERIES:
                self._inspected.popitem(last=False)
            try:
                rows, columns = int(header.Rows), int(header.Columns)
                spacing = tuple(float(v) for v in header.PixelSpacing)
            except (AttributeError, TypeError, ValueError):
                continue  # not an image, or its spacing is per frame (enhanced): not needed
            if len(spacing) != 2 or min(spacing) <= 0:
                continue
            for spec in loaded:
                key = (spec.name, rows, columns, round(spacing[0], 4), round(spacing[1], 4))
                if instance.modality in spec.series.modalities and key not in self._ready_for:
                    self._ready_for.add(key)
                    self._run_zeros(spec.name, rows, columns, (spacing[0], spacing[1]), uid)
        return True

    def _run_zeros(
        self, name: str, rows: int, columns: int, spacing: tuple[float, float], series_uid: str
    ) -> None:
        """One batch of zeros of this size through model ``name`` (see above)."""
        began = time.perf_counter()
        try:
            _, predictor = self.pool.get(name)
            batch = max(1, int(getattr(predictor, "batch_size", 1)))
            predictor.predict(np.zeros((batch, rows, columns), dtype=np.int16), (1.0, *spacing))
        except Exception:
            logger.warning(
                "model not readied for an incoming size",
                exc_info=True,
                extra={"model": name, "series_instance_uid": series_uid},
            )
            return
        logger.info(
            "model %s readied for %dx%d slices at %.3f/%.3f mm in %.2f s",
            name,
            rows,
            columns,
            *spacing,
            time.perf_counter() - began,
            extra={"series_instance_uid": series_uid},
        )

    def _fail(self, job: ClaimedJob, error: str, *, retryable: bool) -> None:
        try:
            state = self.jobs.fail(job.id, job.token, error, retryable=retryable)
        except JobLeaseLostError:
            logger.warning("lease lost before failing the job", extra={"job_id": job.id})
            return
        logger.warning(
            "job attempt failed",
            extra={
                "job_id": job.id,
                "state": str(state),
                "study_instance_uid": job.study_instance_uid,
            },
        )

    @contextmanager
    def _stage(self, job: ClaimedJob, stage: Stage) -> Iterator[dict[str, Any]]:
        """Time a stage and record it (event + duration) when it ends without error."""
        note: dict[str, Any] = {}
        started = time.perf_counter()
        yield note
        self.jobs.record_stage(
            job.id,
            job.token,
            stage,
            time.perf_counter() - started,
            note.get("message", ""),
            note.get("data"),
            note.get("level", Level.INFO),
        )

    def _process(self, job: ClaimedJob) -> None:
        ids = {"job_id": job.id, "study_instance_uid": job.study_instance_uid}
        # A model that cannot load fails this attempt (retryable: another worker may hold
        # it) and is marked down, so this worker claims no more of its jobs.
        try:
            spec = self.pool.specs[job.model]
        except KeyError:
            raise ModelError(f"model {job.model} is not served by this worker") from None
        with self._stage(job, Stage.SELECT) as note:
            series = self.jobs.study_series(job.study_instance_uid)
            if spec.series.per_series and job.series_instance_uid is not None:
                # A per-series job segments its own series only (a study-level job that
                # is re-run chooses again: its series_instance_uid is an earlier result).
                series = {uid: f for uid, f in series.items() if uid == job.series_instance_uid}
            selection = choose_stack(read_stacks(series, self.headers), spec.series.rules())
            note["message"] = selection.summary()
            if selection.warnings:
                # Segmentable but irregular: the job says what was irregular.
                note["message"] += "; warning: " + "; ".join(selection.warnings)
                note["data"] = {"warnings": list(selection.warnings)}
                note["level"] = Level.WARNING
        if selection.stack is None:
            # A refusal, not a fault: the one-line reason is the job's error, and an admin
            # can re-run the job after changing the model's series rules.
            self._fail(job, selection.summary(), retryable=False)
            return
        series_uid = selection.stack.series_instance_uid

        with self._stage(job, Stage.LOAD) as note:
            volume = load_stack(selection.stack)
            note["message"] = describe(selection.stack)
            note["data"] = {
                "slices": volume.shape[0],
                "dtype": str(volume.array.dtype),
                "mib": round(volume.array.nbytes / 2**20, 1),
            }
        with self._stage(job, Stage.INFERENCE) as note:
            predictor = self._predictor(job)
            before = dict(getattr(predictor, "stage_s", {}))
            labelmap = predictor.predict(
                volume.array, volume.spacing_zyx, axis_directions(volume.stack.orientation)
            )
            removed = keep_largest_components(labelmap, spec.labels)
            note["message"] = f"model {spec.name} {spec.version}, device {predictor.device}"
            # The slice runtime times its own steps (prepare, resample, network, labels).
            after: dict[str, float] = dict(getattr(predictor, "stage_s", {}))
            note["data"] = {
                "variant": str(getattr(predictor, "variant", "")),
                "stages_s": {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()},
            }
            if removed:
                # Voxels outside a one-piece organ's largest component (the card asks).
                note["data"]["removed_voxels"] = removed
        # The preview needs the pixels; render it now and free them before the SEG is built
        # (the peak of a big study's memory was there).
        preview = self._render_preview(job, spec, volume.array, labelmap)
        measurements = measure_segments(volume, labelmap, spec)  # also the SR's numbers
        if not any("sc" in dest.outputs for dest in self.config.destinations):
            # Only the overlay series draws on the source pixels after this point.
            volume = volume.without_pixels()
        with self._stage(job, Stage.SEG) as note:
            uids = output_uids(
                "seg",
                source_series_instance_uid=volume.series_instance_uid,
                model_name=spec.name,
                model_version=spec.version,
                source_sop_instance_uids=(str(ds.SOPInstanceUID) for ds in volume.datasets),
            )
            # The PNG (an optimised encode, then fsyncs) is written while the SEG is built:
            # both are slow, and the encoder and the file system leave the GIL to the build.
            preview_writer: threading.Thread | None = None
            if preview is not None and labelmap.any():  # a SEG will be built: it has labels
                seg_file = self.config.outbox_dir / str(job.id) / f"{uids.sop_instance_uid}.dcm"
                preview_writer = threading.Thread(
                    target=self._write_preview,
                    args=(job, preview, seg_file),
                    name=f"preview-{job.id}",
                    daemon=True,
                )
                preview_writer.start()
            history = self.jobs.seg_history(uids.series_instance_uid)
            number, previous = _number(history, uids.sop_instance_uid)
            began = time.perf_counter()
            seg = build_segmentation(
                volume,
                labelmap,
                spec,
                software_version=self.config.software_version,
                instance_number=number,
            )
            built_s = time.perf_counter() - began
            seg_path: Path | None = None
            seg_uid: str | None = None
            supersedes: Supersession | None = None
            objects: dict[str, list[OutputObject]] | None = None
            if seg is None:
                note["message"] = "no label found: no SEG built"
            else:
                seg_uid = str(seg.SOPInstanceUID)
                if seg_uid != uids.sop_instance_uid:  # pragma: no cover - one UID rule
                    raise RuntimeError(f"SEG UID {seg_uid} is not {uids.sop_instance_uid}")
                job_dir = self.config.outbox_dir / str(job.id)
                seg_path = job_dir / f"{seg_uid}.dcm"
                job_dir.mkdir(parents=True, exist_ok=True)
                began = time.perf_counter()
                write_segmentation(seg, seg_path)
                written_s = time.perf_counter() - began
                size = seg_path.stat().st_size
                note["message"] = (
                    f"SEG {seg_uid} (instance {number}), {len(seg.SegmentSequence)} segment(s), "
                    f"{seg.SegmentationType}: built in {built_s:.2f} s, written in "
                    f"{written_s:.2f} s ({size / 2**20:.1f} MiB)"
                )
                note["data"] = {
                    "build_s": round(built_s, 3),
                    "write_s": round(written_s, 3),
                    "bytes": size,
                    "seg_type": str(seg.SegmentationType),
                }
                outputs = _Outputs(
                    volume, labelmap, spec, measurements, number, job_dir, self.config
                )
                objects = outputs.for_destinations(seg, seg_path)
                if outputs.notes:
                    note["message"] += "; " + "; ".join(outputs.notes)
                if outputs.problems:
                    # The SEG stands: an object that could not be built is left out (its
                    # deliveries with it) and said so; a re-run of the job tries again.
                    note["message"] += "; warning: " + "; ".join(outputs.problems)
                    note["data"]["warnings"] = list(outputs.problems)
                    note["level"] = Level.WARNING
                if previous is not None:
                    notes = self._rejection_notes(
                        spec, history, seg, job_dir, volume.series_instance_uid
                    )
                    supersedes = Supersession(previous, notes)
        if preview_writer is not None:
            preview_writer.join()  # the preview is beside the SEG before the result is recorded
        logger.info("inference done", extra={**ids, "series_instance_uid": series_uid})
        outcome = Outcome.SEG if seg_path else Outcome.NO_FINDINGS
        self._complete(
            job,
            series_uid,
            seg_path,
            seg_uid,
            outcome,
            seg_series_uid=uids.series_instance_uid,
            seg_instance_number=number,
            supersedes=supersedes,
            objects=objects,
            measurements=[m.to_json() for m in measurements],
        )

    def _rejection_notes(
        self,
        spec: ModelSpec,
        history: list[SegVersion],
        seg: Dataset,
        job_dir: Path,
        source_series_uid: str,
    ) -> dict[str, RejectionNote]:
        """Write one IOCM rejection note per SEG to retract, for the destinations with
        ``supersede = "iocm"``: the newest earlier SEG each of them holds."""
        notes: dict[str, RejectionNote] = {}
        written: dict[str, RejectionNote] = {}
        for dest in self.config.destinations:
            if dest.supersede != "iocm":
                continue
            rejects = newest_held(history, dest.name, str(seg.SOPInstanceUID))
            if rejects is None:
                continue
            if rejects.sop_instance_uid not in written:
                superseded = InstanceReference(
                    study_instance_uid=str(seg.StudyInstanceUID),
                    series_instance_uid=str(seg.SeriesInstanceUID),
                    sop_instance_uid=rejects.sop_instance_uid,
                    sop_class_uid=str(seg.SOPClassUID),
                )
                kos = build_rejection_note(
                    superseded,
                    seg,
                    source_series_instance_uid=source_series_uid,
                    model_name=spec.name,
                    model_version=spec.version,
                    software_version=self.config.software_version,
                    instance_number=int(seg.InstanceNumber),
                )
                path = job_dir / f"{kos.SOPInstanceUID}.dcm"
                write_rejection_note(kos, path)
                written[rejects.sop_instance_uid] = RejectionNote(
                    rejects, str(path), str(kos.SOPInstanceUID)
                )
            notes[dest.name] = written[rejects.sop_instance_uid]
        return notes

    def _predictor(self, job: ClaimedJob) -> LoadedModel:
        """The job's model, loaded (maybe evicting the least recently used one)."""
        try:
            _, predictor = self.pool.get(job.model)
        except ModelError as exc:
            # Retryable: the model is down on this worker only; another may serve it.
            raise _ModelDownError(str(exc)) from exc
        return predictor

    def _render_preview(
        self, job: ClaimedJob, spec: ModelSpec, image: Any, labelmap: Any
    ) -> Image.Image | None:
        """PNG preview for the dashboard; a failure is logged, never fatal."""
        window = _display_window(spec)
        try:
            return render_preview(image, labelmap, spec.labels, window=window)
        except Exception:
            logger.warning("SEG preview not rendered", exc_info=True, extra={"job_id": job.id})
            return None

    def _write_preview(self, job: ClaimedJob, preview: Image.Image, seg_path: Path) -> None:
        """Write the preview beside the SEG; a failure is logged, never fatal."""
        try:
            write_preview(preview, preview_path_for(seg_path))
        except Exception:
            logger.warning("SEG preview not written", exc_info=True, extra={"job_id": job.id})

    def _complete(
        self,
        job: ClaimedJob,
        series_uid: str | None,
        seg_path: Path | None,
        seg_uid: str | None,
        outcome: Outcome,
        *,
        seg_series_uid: str | None = None,
        seg_instance_number: int | None = None,
        supersedes: Supersession | None = None,
        objects: dict[str, list[OutputObject]] | None = None,
        measurements: list[dict[str, Any]] | None = None,
    ) -> None:
        state = self.jobs.complete(
            job.id,
            job.token,
            series_instance_uid=series_uid,
            seg_path=str(seg_path) if seg_path else None,
            seg_sop_instance_uid=seg_uid,
            outcome=outcome,
            destinations=self.config.destinations,
            seg_series_instance_uid=seg_series_uid,
            seg_instance_number=seg_instance_number,
            supersedes=supersedes,
            objects=objects,
            measurements=measurements,
        )
        if state is JobState.DONE:
            logger.info("job done", extra={"job_id": job.id, "outcome": outcome.value})
        elif self._wake_dispatch is not None:
            self._wake_dispatch.set()


class _Outputs:
    """Builds what each destination gets of one result, each object once.

    The BINARY SEG is the job's own (built by the caller); a LABELMAP SEG is built when a
    destination wants one; an SR references the SEG its destination gets (of its
    ``seg_type``). An object that cannot be built is left out and named in ``problems``.
    Another kind is one more branch in :meth:`_build` (an object kind may give several
    files: each is its own delivery).
    """

    def __init__(
        self,
        volume: SourceVolume,
        labelmap: np.ndarray,
        spec: ModelSpec,
        measurements: tuple[SegmentMeasurement, ...],
        number: int,
        job_dir: Path,
        config: WorkerConfig,
    ) -> None:
        self._volume, self._labelmap, self._spec = volume, labelmap, spec
        self._measurements = measurements
        self._number, self._dir, self._config = number, job_dir, config
        self._segs: dict[str, tuple[Dataset, OutputObject] | None] = {}
        self._built: dict[tuple[str, str], list[OutputObject]] = {}
        #: What was built beside the BINARY SEG, and what could not be.
        self.notes: list[str] = []
        self.problems: list[str] = []

    def for_destinations(self, seg: Dataset, seg_path: Path) -> dict[str, list[OutputObject]]:
        """Per destination name, its objects in sending order (SEG first)."""
        self._segs["binary"] = (
            seg,
            OutputObject(DeliveryKind.SEG, str(seg_path), str(seg.SOPInstanceUID)),
        )
        return {
            dest.name: [obj for kind in dest.outputs for obj in self._build(kind, dest.seg_type)]
            for dest in self._config.destinations
        }

    def _build(self, kind: str, seg_type: str) -> list[OutputObject]:
        key = (kind, seg_type)
        if key not in self._built:
            if kind == "seg":
                built = self._seg(seg_type)
                self._built[key] = [] if built is None else [built[1]]
            elif kind == "sr":
                self._built[key] = self._sr(seg_type)
            elif kind == "sc":
                # The overlay does not depend on the SEG's encoding: one series for all.
                key = ("sc", "")
                if key not in self._built:
                    self._built[key] = self._sc()
            else:  # pragma: no cover - settings refuse other kinds
                raise ValueError(f"unknown output kind {kind!r}")
        return self._built[key]

    def _seg(self, seg_type: str) -> tuple[Dataset, OutputObject] | None:
        if seg_type not in self._segs:
            if seg_type != "labelmap":  # pragma: no cover - settings allow binary|labelmap
                raise ValueError(f"unknown seg_type {seg_type!r}")
            try:
                seg = build_segmentation(
                    self._volume,
                    self._labelmap,
                    self._spec,
                    software_version=self._config.software_version,
                    instance_number=self._number,
                    seg_type="labelmap",
                )
                assert seg is not None  # the BINARY SEG of the same labelmap has segments
                path = self._dir / f"{seg.SOPInstanceUID}.dcm"
                write_segmentation(seg, path)
            except SegmentationError as exc:
                self.problems.append(f"{seg_type.upper()} SEG not built: {exc}")
                self._segs[seg_type] = None
            else:
                self.notes.append(f"{seg_type.upper()} SEG {seg.SOPInstanceUID}")
                obj = OutputObject(DeliveryKind.SEG, str(path), str(seg.SOPInstanceUID))
                self._segs[seg_type] = (seg, obj)
        return self._segs[seg_type]

    def _sr(self, seg_type: str) -> list[OutputObject]:
        built = self._seg(seg_type)
        if built is None:
            self.problems.append(f"SR not built: its {seg_type.upper()} SEG is missing")
            return []
        try:
            sr = build_measurement_report(
                self._volume,
                built[0],
                self._measurements,
                self._spec,
                software_version=self._config.software_version,
                instance_number=self._number,
            )
            path = self._dir / f"{sr.SOPInstanceUID}.dcm"
            write_measurement_report(sr, path)
        except SegmentationError as exc:
            self.problems.append(f"SR not built: {exc}")
            return []
        self.notes.append(f"SR {sr.SOPInstanceUID} of SEG {built[1].sop_instance_uid}")
        return [OutputObject(DeliveryKind.SR, str(path), str(sr.SOPInstanceUID))]

    def _sc(self) -> list[OutputObject]:
        """The overlay series: one Secondary Capture image per slice with a finding."""
        spec = self._spec
        window = _display_window(spec)
        uids = output_uids(
            "sc",
            source_series_instance_uid=self._volume.series_instance_uid,
            model_name=spec.name,
            model_version=spec.version,
            source_sop_instance_uids=(str(ds.SOPInstanceUID) for ds in self._volume.datasets),
        )
        objects: list[OutputObject] = []
        try:
            images = build_overlay_series(
                self._volume,
                self._labelmap,
                spec,
                uids=uids,
                window=window,
                software_version=self._config.software_version,
                series_number=_SC_SERIES_NUMBER,
            )
            for image in images:
                path = self._dir / f"{image.SOPInstanceUID}.dcm"
                write_durably(path, partial(image.save_as, enforce_file_format=True))
                objects.append(OutputObject(DeliveryKind.SC, str(path), str(image.SOPInstanceUID)))
        except (OverlayError, OSError, ValueError) as exc:
            self.problems.append(f"SC overlay not built: {exc}")
            return []
        self.notes.append(f"SC series {uids.series_instance_uid}, {len(objects)} image(s)")
        return objects


def _synthetic_series(folder: Path, slices: int = 3, size: int = 8) -> list[Path]:
    """A tiny axial CT series of no one (fresh UIDs), written into ``folder`` for the
    warm-up: every attribute a SEG's source image needs, pixels of value 0."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for index in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PatientName, ds.PatientID = "WARM^UP", "WARM-UP"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20000101", "000000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, float(index)]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation, ds.SamplesPerPixel = 1, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = bytes(2 * size * size)
        path = folder / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _display_window(spec: ModelSpec) -> tuple[float, float] | None:
    """The card's CT window (centre, width) for drawn images, or None (auto)."""
    if spec.input.window_center is not None and spec.input.window_width:
        return (spec.input.window_center, spec.input.window_width)
    return None


def _number(history: list[SegVersion], sop_instance_uid: str) -> tuple[int, SegVersion | None]:
    """InstanceNumber of a SEG in its series and the version it supersedes.

    The same input (a SOP Instance UID already made) keeps its number and supersedes
    nothing; a new one comes after the newest and supersedes it.
    """
    for version in history:
        if version.sop_instance_uid == sop_instance_uid:
            return version.instance_number, None
    newest = max(history, key=lambda v: (v.instance_number, v.job_id), default=None)
    return (1, None) if newest is None else (newest.instance_number + 1, newest)
