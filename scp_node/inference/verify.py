"""Start-up verification of model variants, and the choice of the fastest correct one.

An int8 or exported variant can compute wrong results on one CPU and right ones on another
(ONNX Runtime's u8s8 kernels saturate without AVX-512 VNNI), so a variant verified on the
build machine proves nothing about this one. Before the worker takes a job,
:func:`select_variant` runs the variant the card asks for on the card's reference case (a
few real slices and the fp32 logits on them, ``[verify] file``) and compares per-label Dice
of the argmax and the largest logit error; a variant below ``verify.min_dice`` is not
used and the next one in the card's order is tried (``fp32`` last). With
``[runtime] cpu = "auto"`` every candidate is verified and the verified ones are timed on
the reference case; the fastest runs. Timings are cached per machine (CPU model and
flags, library versions, threads, file hashes) so later starts do not time again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from scp_node.durable import write_bytes_durably
from scp_node.errors import ModelError
from scp_node.inference.predictor import Predictor
from scp_node.inference.registry import AUTO_VARIANT, REFERENCE_VARIANT, ModelSpec

__all__ = [
    "REFERENCE_FILE",
    "ReferenceCase",
    "VariantCheck",
    "VariantSelection",
    "check_variant",
    "cpu_flags",
    "label_dice",
    "machine_key",
    "read_variant_cache",
    "select_variant",
    "selection_summary",
]

logger = logging.getLogger(__name__)

#: Default name of a card's reference case.
REFERENCE_FILE = "reference.npz"
#: Timing repetitions per variant on the reference case, after the verification run (the
#: warm-up, same shapes); the fastest counts, as other processes share the cores.
TIMING_ROUNDS = 3
#: A variant whose first timed run (after the verification run, which is cold: ONNX
#: Runtime, oneDNN and OpenVINO set up or compile on it) is this many times slower than
#: the fastest so far is not timed further: it cannot win, and start-up stays short.
HOPELESS = 4.0


@dataclass(frozen=True)
class ReferenceCase:
    """Input at the model spacing and the fp32 logits of each ``state_dict`` network on it.

    Stored as ``.npz``: ``input`` (N, C, rows, columns), ``logits`` for ``[weights]`` and
    ``logits_<variant>`` for every other ``state_dict`` variant (N, classes, rows, columns).
    """

    inputs: npt.NDArray[np.float32]
    #: Reference variant name (``"fp32"``, ``"pruned"``, ...) -> its logits.
    logits: dict[str, npt.NDArray[np.float32]]

    @classmethod
    def load(cls, path: Path) -> ReferenceCase:
        """Read the ``.npz``.

        Raises
        ------
        ModelError
            The file is missing, not an ``.npz`` or lacks ``input`` or ``logits``.
        """
        try:
            with np.load(path) as data:
                logits = {REFERENCE_VARIANT: np.asarray(data["logits"], dtype=np.float32)}
                for key in data.files:
                    if key.startswith("logits_"):
                        logits[key.removeprefix("logits_")] = np.asarray(data[key], np.float32)
                return cls(np.asarray(data["input"], dtype=np.float32), logits)
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"cannot read reference case {path}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write the ``.npz`` (compressed)."""
        arrays = {"input": self.inputs, "logits": self.logits[REFERENCE_VARIANT]}
        arrays |= {f"logits_{k}": v for k, v in self.logits.items() if k != REFERENCE_VARIANT}
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


@dataclass(frozen=True)
class VariantCheck:
    """One variant on the reference case: agreement with fp32 and, when timed, speed."""

    variant: str
    ok: bool
    #: Label name -> Dice of the variant's argmax against the fp32 reference's.
    dice: dict[str, float] = field(default_factory=dict)
    max_logit_error: float | None = None
    #: Why the variant is rejected ("" when ok).
    reason: str = ""
    ms_per_slice: float | None = None
    #: Timed runs behind ``ms_per_slice`` (the fastest counts); 1 for a variant whose first
    #: warm run was already far slower than the fastest (not timed further); 0 for an
    #: eager variant whose verification run was (its time stands).
    timed_runs: int = 0

    def describe(self) -> str:
        """``"variant X rejected on this machine: Dice 0.68 < 0.99 (liver)"`` or a pass."""
        if self.ok:
            return f"variant {self.variant} verified on this machine: {self.reason or 'ok'}"
        return f"variant {self.variant} rejected on this machine: {self.reason}"


@dataclass(frozen=True)
class VariantSelection:
    """What :func:`select_variant` decided, for logs, ``/healthz`` and ``model status``."""

    model: str
    device: str
    #: The card's (or the setting's) request: a variant name or ``"auto"``.
    requested: str
    chosen: str
    checks: tuple[VariantCheck, ...]
    verified: bool
    #: Timings came from the per-machine cache (``auto`` only).
    cached: bool = False
    seconds: float = 0.0

    @property
    def rejected(self) -> tuple[VariantCheck, ...]:
        """The variants that failed verification."""
        return tuple(c for c in self.checks if not c.ok)

    @property
    def notes(self) -> tuple[str, ...]:
        """One line per rejected variant (no identifiers of patients: card data only)."""
        return tuple(c.describe() for c in self.rejected)

    @property
    def timings_ms(self) -> dict[str, float]:
        """Variant -> ms per reference slice, for the timed ones."""
        return {c.variant: c.ms_per_slice for c in self.checks if c.ms_per_slice is not None}

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "model": self.model,
            "device": self.device,
            "requested": self.requested,
            "chosen": self.chosen,
            "verified": self.verified,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "rejected": list(self.notes),
            "checks": [asdict(c) for c in self.checks],
        }

    def log(self, log: logging.Logger) -> None:
        """Log each rejected variant (a warning) and the choice (info) to ``log``."""
        for note in self.notes:
            log.warning("model %s: %s", self.model, note)
        log.info(
            "model %s runs variant %s (requested %s; %.2f s to verify%s)",
            self.model,
            self.chosen,
            self.requested,
            self.seconds,
            ", timings cached" if self.cached else "",
        )


def label_dice(
    reference: npt.NDArray[np.integer], candidate: npt.NDArray[np.integer], classes: int
) -> list[float]:
    """Dice of class indices 1..classes-1 between two label arrays (1.0 when both empty)."""
    scores = []
    for k in range(1, classes):
        a, b = reference == k, candidate == k
        total = int(a.sum()) + int(b.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
    return scores


def check_variant(
    predictor: Predictor,
    spec: ModelSpec,
    case: ReferenceCase,
    *,
    rounds: int = 0,
    best_ms: float | None = None,
) -> VariantCheck:
    """Run the loaded variant of ``predictor`` on ``case`` and compare with fp32.

    The comparison is with the fp32 output of the network the variant was made from
    (:meth:`~scp_node.inference.registry.ModelSpec.reference_of`): an int8 file of the
    pruned network must reproduce the pruned network, not the unpruned one.

    Parameters
    ----------
    predictor
        A predictor with the variant loaded.
    spec
        The card (labels, ``[verify]`` thresholds).
    case
        The reference case.
    rounds
        When > 0, also time this many further runs (the fastest, ms per slice).
    best_ms
        The fastest variant so far: when the first timed run is ``HOPELESS`` times
        slower, its time is reported without further runs. The verification run is not
        timed: it pays one-off set-up (OpenVINO compiles the graph for the slice size on
        it), which would make a fast variant look hopeless.

    Returns
    -------
    VariantCheck
        ``ok`` is False when a label's Dice is below ``verify.min_dice``, the logit error
        above ``verify.max_logit_error``, the output has the wrong shape or is not finite,
        or the variant raises.
    """
    name = predictor.variant
    source = spec.reference_of(name)
    expected = case.logits.get(source)
    if expected is None:
        return VariantCheck(name, False, reason=f"the reference case has no output of {source}")
    batch = torch.from_numpy(case.inputs).to(predictor.device)
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            logits = predictor.logits(batch).float().cpu().numpy()
        cold_ms = round(1000 * (time.perf_counter() - started) / len(batch), 3)
    except (RuntimeError, ValueError, ModelError) as exc:
        return VariantCheck(name, False, reason=f"fails on the reference case: {exc}")
    if logits.shape != expected.shape:
        return VariantCheck(
            name, False, reason=f"output shape {logits.shape} != reference {expected.shape}"
        )
    if not np.isfinite(logits).all():
        return VariantCheck(name, False, reason="non-finite logits")
    error = float(np.abs(logits - expected).max())
    scores = label_dice(expected.argmax(axis=1), logits.argmax(axis=1), logits.shape[1])
    dice = {label.name: round(score, 4) for label, score in zip(spec.labels, scores, strict=False)}
    limits = spec.verify
    worst = min(dice, key=lambda n: dice[n]) if dice else None
    if worst is not None and dice[worst] < limits.min_dice:
        reason = f"Dice {dice[worst]:.2f} < {limits.min_dice:.2f} ({worst})"
        return VariantCheck(name, False, dice, error, reason)
    if limits.max_logit_error is not None and error > limits.max_logit_error:
        reason = f"max logit error {error:.3g} > {limits.max_logit_error:.3g}"
        return VariantCheck(name, False, dice, error, reason)
    summary = f"vs {source}: " + ", ".join(f"Dice {n} {d:.4f}" for n, d in dice.items())
    summary += f", max logit error {error:.3g}"
    if rounds <= 0:
        return VariantCheck(name, True, dice, error, summary)
    if (
        best_ms is not None
        and cold_ms > HOPELESS * best_ms
        and spec.variant(name).format == "state_dict"
    ):
        # Eager torch sets nothing up on its first run (no graph compile, no JIT
        # profiling): that run already shows it cannot win (fp32 on the CPU, typically).
        return VariantCheck(name, True, dice, error, summary, cold_ms, 0)
    first_ms = _time(predictor, batch, 1)
    if rounds == 1 or (best_ms is not None and first_ms > HOPELESS * best_ms):
        return VariantCheck(name, True, dice, error, summary, first_ms, 1)
    fastest = min(first_ms, _time(predictor, batch, rounds - 1))
    return VariantCheck(name, True, dice, error, summary, fastest, rounds)


def _time(predictor: Predictor, batch: torch.Tensor, rounds: int) -> float:
    runs = []
    with torch.inference_mode():
        for _ in range(rounds):
            started = time.perf_counter()
            for part in torch.split(batch, predictor.batch_size):
                predictor.logits(part)
            runs.append(1000 * (time.perf_counter() - started) / len(batch))
    return round(min(runs), 3)


def cpu_flags() -> tuple[str, str]:
    """(CPU model name, space-separated flags) from ``/proc/cpuinfo`` (else ``platform``)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = " ".join(sorted(value.split()))
    return model, flags


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def machine_key(spec: ModelSpec, names: list[str], threads: int) -> str:
    """Cache key of timings: CPU model and flags, library versions, threads, file hashes."""
    model, flags = cpu_flags()
    parts = [model, flags, torch.__version__, f"threads={threads}", spec.version]
    try:
        import onnxruntime

        parts.append(f"onnxruntime={onnxruntime.__version__}")
    except ImportError:  # pragma: no cover - a runtime dependency
        pass
    if any(spec.variant(n).engine == "openvino" for n in names):
        try:
            import openvino

            parts.append(f"openvino={openvino.__version__}")
        except ImportError:
            pass
    files = [spec.variant(n).file for n in names]
    if spec.verify.file is not None:
        files.append(spec.verify.file)
    for file in sorted(set(files)):
        parts.append(f"{file}={_file_hash(spec.directory / file)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def read_variant_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The per-machine variant cache at ``path`` if it was written for ``key``; None when
    it is missing, unreadable, not a JSON object or written for another key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    return data


def select_variant(
    spec: ModelSpec,
    make_predictor: Callable[[], Predictor],
    *,
    requested: str | None = None,
    cache_dir: Path | None = None,
) -> tuple[Predictor, VariantSelection]:
    """Load the variant this machine should run, verified on the card's reference case.

    Parameters
    ----------
    spec
        The model card.
    make_predictor
        Makes an empty predictor with the runtime settings (device, threads).
    requested
        A variant name, ``"auto"``, or ``None`` / ``""`` for the card's ``[runtime]``.
    cache_dir
        Folder of the per-machine timing cache (``<model>.json``) for ``"auto"``; ``None``
        times every start.

    Returns
    -------
    (Predictor, VariantSelection)
        The loaded predictor and what was decided (every rejection with its reason).

    Raises
    ------
    ModelError
        No candidate passes verification (not even ``fp32``), or a requested variant is
        unknown.
    """
    started = time.perf_counter()
    probe = make_predictor()
    device = probe.device
    if device == "cuda":
        want = requested or spec.runtime.cuda
        if want == AUTO_VARIANT:
            want = spec.runtime.cuda
        names = list(dict.fromkeys([want, REFERENCE_VARIANT]))
    else:
        want = requested or spec.runtime.cpu
        names = spec.cpu_candidates(want)
    for name in names:
        spec.variant(name)  # unknown names fail before anything runs
    if spec.verify.file is None:
        probe.load(spec, names[0])
        selection = VariantSelection(
            spec.name, device, want, names[0], (), False, seconds=time.perf_counter() - started
        )
        logger.warning(
            "model %s has no reference case: variant %s runs unverified", spec.name, names[0]
        )
        return probe, selection
    case = ReferenceCase.load(spec.directory / spec.verify.file)
    if want == AUTO_VARIANT and device == "cpu":
        predictor, checks, chosen, cached = _auto(spec, make_predictor, names, case, cache_dir)
    else:
        predictor, checks, chosen = _first_verified(spec, make_predictor, names, case)
        cached = False
    selection = VariantSelection(
        spec.name,
        predictor.device,
        want,
        chosen,
        tuple(checks),
        True,
        cached,
        time.perf_counter() - started,
    )
    selection.log(logger)
    return predictor, selection


def _load_and_check(
    spec: ModelSpec,
    make_predictor: Callable[[], Predictor],
    name: str,
    case: ReferenceCase,
    best_ms: float | None = None,
    *,
    timed: bool = True,
) -> tuple[Predictor | None, VariantCheck]:
    predictor = make_predictor()
    try:
        predictor.load(spec, name)
    except ModelError as exc:
        return None, VariantCheck(name, False, reason=f"cannot load: {exc}")
    rounds = TIMING_ROUNDS if timed else 0
    return predictor, check_variant(predictor, spec, case, rounds=rounds, best_ms=best_ms)


def _ms(checks: list[VariantCheck], name: str) -> float:
    return next(c.ms_per_slice or 0.0 for c in checks if c.variant == name)


def _first_verified(
    spec: ModelSpec, make_predictor: Callable[[], Predictor], names: list[str], case: ReferenceCase
) -> tuple[Predictor, list[VariantCheck], str]:
    checks: list[VariantCheck] = []
    for name in names:
        predictor, check = _load_and_check(spec, make_predictor, name, case, timed=False)
        checks.append(check)
        if check.ok and predictor is not None:
            return predictor, checks, name
    raise ModelError(_none_passed(spec, checks))


def _none_passed(spec: ModelSpec, checks: list[VariantCheck]) -> str:
    # On CUDA fp32 runs under autocast (bf16/fp16): a GPU whose low-precision output
    # disagrees can still run the model exactly with cuda_autocast = "none".
    hint = ' (on CUDA try [runtime] cuda_autocast = "none")'
    return (
        f"{spec.name}: no variant passes verification on this machine: "
        + "; ".join(c.describe() for c in checks)
        + hint
    )


def _auto(
    spec: ModelSpec,
    make_predictor: Callable[[], Predictor],
    names: list[str],
    case: ReferenceCase,
    cache_dir: Path | None,
) -> tuple[Predictor, list[VariantCheck], str, bool]:
    """Verify and time every candidate (or take the timings from the cache); load the
    fastest verified one, re-verifying it now."""
    threads = torch.get_num_threads()
    cache_path = cache_dir / f"{spec.name}.json" if cache_dir is not None else None
    key = machine_key(spec, names, threads)
    cached = read_variant_cache(cache_path, key) if cache_path is not None else None
    if cached is not None:
        checks = [VariantCheck(**c) for c in cached["checks"]]
        ranked = _ranked(checks)
        for name in ranked:
            predictor, check = _load_and_check(spec, make_predictor, name, case, timed=False)
            if check.ok and predictor is not None:
                return predictor, checks, name, True
            # Same files, same machine, and now it fails: record it and time afresh.
            logger.warning("model %s: cached choice %s fails now: %s", spec.name, name, check)
            break
    checks = []
    loaded: dict[str, Predictor] = {}
    best: float | None = None
    for name in names:
        predictor, check = _load_and_check(spec, make_predictor, name, case, best)
        checks.append(check)
        if check.ok and predictor is not None:
            loaded[name] = predictor
            if check.ms_per_slice is not None:
                best = min(best or check.ms_per_slice, check.ms_per_slice)
            if len(loaded) > 1:
                # Keep only the fastest loaded: each predictor holds its weights in memory.
                slowest = max(loaded, key=lambda n: _ms(checks, n))
                del loaded[slowest]
    ranked = _ranked(checks)
    if not ranked:
        raise ModelError(_none_passed(spec, checks))
    if cache_path is not None:
        body = {
            "key": key,
            "model": spec.name,
            "cpu": cpu_flags()[0],
            "threads": threads,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checks": [asdict(c) for c in checks],
        }
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(cache_path, (json.dumps(body, indent=2) + "\n").encode())
    return loaded[ranked[0]], checks, ranked[0], False


def _ranked(checks: list[VariantCheck]) -> list[str]:
    """Verified, timed variants, fastest first."""
    timed = [c for c in checks if c.ok and c.ms_per_slice is not None]
    return [c.variant for c in sorted(timed, key=lambda c: c.ms_per_slice or 0.0)]


def selection_summary(selection: VariantSelection) -> str:
    """One line for the health page: the variant in use and why others are not."""
    text = f"{selection.model} variant {selection.chosen}"
    if not selection.verified:
        return text + " (not verified: the card has no reference case)"
    text += " (verified on this machine"
    if selection.requested == AUTO_VARIANT:
        text += ", fastest of " + ", ".join(
            f"{n} {ms:.1f} ms" for n, ms in sorted(selection.timings_ms.items(), key=_by_ms)
        )
    return text + ")"


def _by_ms(item: tuple[str, float]) -> float:
    return item[1]
