"""Start-up verification of volume (3-D) model variants, and the choice between them.

The 3-D counterpart of :mod:`scp_node.inference.verify`: a volume card's reference case is
one network patch at the network's spacing (``input`` (1, 1, *patch)), the fp32 network's
argmax on it (``labels``) and its logits sub-sampled every ``stride`` voxels (``logits``,
float16, so a 25-class 112x112x128 case stays a few MB). Before the worker takes a job,
:func:`select_volume_variant` runs each candidate's network on the patch and compares the
per-label Dice of the argmax with ``labels`` and the largest logit error on the sampled
voxels; a variant below ``verify.min_dice`` is not used and the next one in the card's
order is tried (``fp32`` last). With ``cpu = "auto"`` the candidates are verified and timed
in the card's order (``model optimize`` writes it fastest first, as measured where it ran)
for at most :data:`AUTO_BUDGET_S` seconds, the first that passes always: one full-size
patch of the fp32 network alone can take longer than that on two cores, and the fp32
result is stored, not recomputed. The fastest verified one runs; the ranking of those
timed is cached per machine like the 2-D one, so later starts verify only the chosen one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from scp_node.durable import write_bytes_durably
from scp_node.errors import ModelError
from scp_node.inference.registry import AUTO_VARIANT, REFERENCE_VARIANT, ModelSpec
from scp_node.inference.runtime.volume import VolumePredictor
from scp_node.inference.verify import (
    VariantCheck,
    VariantSelection,
    cpu_flags,
    label_dice,
    read_variant_cache,
)

__all__ = [
    "AUTO_BUDGET_S",
    "VolumeReference",
    "check_volume_variant",
    "network_logits",
    "select_volume_variant",
]

logger = logging.getLogger(__name__)

#: Seconds an uncached ``auto`` start spends verifying and timing candidates: once one has
#: passed, the next is tried only if the time so far plus the slowest try so far fits.
AUTO_BUDGET_S = 8.0


@dataclass(frozen=True)
class VolumeReference:
    """One patch and the fp32 network's output on it (``.npz`` keys in brackets).

    Attributes
    ----------
    inputs
        (1, 1, *patch) float32 at the network's spacing, normalised (``input``).
    labels
        (1, *patch) uint8 argmax of the fp32 logits (``labels``).
    logits
        (1, classes, *patch[::stride]) float16 fp32 logits, sub-sampled (``logits``).
    stride
        Sub-sampling step of ``logits`` along each axis (``stride``).
    """

    inputs: npt.NDArray[np.float32]
    labels: npt.NDArray[np.uint8]
    logits: npt.NDArray[np.float16]
    stride: int

    @classmethod
    def from_logits(
        cls, inputs: npt.NDArray[np.float32], logits: npt.NDArray[np.float32], stride: int = 4
    ) -> VolumeReference:
        """The case of ``inputs`` given the fp32 network's ``logits`` on it."""
        sub = logits[:, :, ::stride, ::stride, ::stride].astype(np.float16)
        return cls(inputs, logits.argmax(axis=1).astype(np.uint8), sub, stride)

    @classmethod
    def load(cls, path: Path) -> VolumeReference:
        """Read the ``.npz``.

        Raises
        ------
        ModelError
            The file is missing, not an ``.npz`` or lacks a key.
        """
        try:
            with np.load(path) as data:
                return cls(
                    np.asarray(data["input"], dtype=np.float32),
                    np.asarray(data["labels"], dtype=np.uint8),
                    np.asarray(data["logits"], dtype=np.float16),
                    int(data["stride"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"cannot read volume reference case {path}: {exc}") from exc

    def save(self, path: Path) -> None:
        """Write the ``.npz`` (compressed)."""
        np.savez_compressed(
            path,
            input=self.inputs,
            labels=self.labels,
            logits=self.logits,
            stride=np.asarray(self.stride),
        )


def network_logits(runtime: VolumePredictor, inputs: npt.NDArray[np.float32]) -> torch.Tensor:
    """The loaded networks' logits on one patch, averaged over folds (no mirroring)."""
    networks = runtime.model.networks
    batch = torch.from_numpy(inputs).to(runtime.torch_device)
    with torch.inference_mode():
        total = sum((net(batch).float().cpu() for net in networks), torch.zeros(()))
    return total / len(networks)


def check_volume_variant(
    runtime: VolumePredictor, spec: ModelSpec, case: VolumeReference
) -> VariantCheck:
    """Run ``runtime``'s loaded variant on ``case`` and compare with the fp32 network.

    Returns
    -------
    VariantCheck
        ``ms_per_slice`` holds the milliseconds of the patch (one run, the cold first
        one). ``ok`` is False when a label's Dice is below ``verify.min_dice``, the logit
        error above ``verify.max_logit_error``, the output has the wrong shape or is not
        finite, or the variant raises.
    """
    name = runtime.variant
    started = time.perf_counter()
    try:
        logits = network_logits(runtime, case.inputs).numpy()
    except (RuntimeError, ValueError, ModelError) as exc:
        return VariantCheck(name, False, reason=f"fails on the reference case: {exc}")
    ms = round(1000 * (time.perf_counter() - started), 1)
    if logits.shape[0] != 1 or logits.shape[2:] != case.labels.shape[1:]:
        return VariantCheck(name, False, reason=f"output shape {logits.shape} does not fit")
    if not np.isfinite(logits).all():
        return VariantCheck(name, False, reason="non-finite logits")
    s = case.stride
    sampled = logits[:, :, ::s, ::s, ::s]
    if sampled.shape != case.logits.shape:
        return VariantCheck(
            name, False, reason=f"{sampled.shape[1]} classes, reference {case.logits.shape[1]}"
        )
    error = float(np.abs(sampled - case.logits.astype(np.float32)).max())
    scores = label_dice(case.labels, logits.argmax(axis=1), logits.shape[1])
    dice = {label.name: round(v, 4) for label, v in zip(spec.labels, scores, strict=False)}
    limits = spec.verify
    worst = min(dice, key=lambda n: dice[n]) if dice else None
    if worst is not None and dice[worst] < limits.min_dice:
        reason = f"Dice {dice[worst]:.2f} < {limits.min_dice:.2f} ({worst})"
        return VariantCheck(name, False, dice, error, reason, ms)
    if limits.max_logit_error is not None and error > limits.max_logit_error:
        reason = f"max logit error {error:.3g} > {limits.max_logit_error:.3g}"
        return VariantCheck(name, False, dice, error, reason, ms)
    summary = "vs fp32: " + ", ".join(f"Dice {n} {d:.4f}" for n, d in dice.items())
    return VariantCheck(name, True, dice, error, summary + f", max logit error {error:.3g}", ms)


def _cache_key(spec: ModelSpec, names: list[str], threads: int) -> str:
    """CPU model and flags, library versions, threads, and the variant files' hashes."""
    import onnxruntime

    model, flags = cpu_flags()
    parts = [model, flags, torch.__version__, f"onnxruntime={onnxruntime.__version__}"]
    parts += [f"threads={threads}", spec.version]
    files = {spec.variant(n).file for n in names if n != REFERENCE_VARIANT}
    if spec.verify.file is not None:
        files.add(spec.verify.file)
    for file in sorted(files):
        parts.append(f"{file}={hashlib.sha256((spec.directory / file).read_bytes()).hexdigest()}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def select_volume_variant(
    spec: ModelSpec,
    make_runtime: Callable[[str], VolumePredictor],
    *,
    requested: str | None = None,
    cache_dir: Path | None = None,
    budget_s: float = AUTO_BUDGET_S,
) -> tuple[VolumePredictor, VariantSelection]:
    """Load the variant of a volume card this machine should run, verified.

    Parameters
    ----------
    spec
        A ``kind = "volume"`` card with ``[verify] file``.
    make_runtime
        Loads the runtime with the named variant (device and threads already chosen).
    requested
        A variant name, ``"auto"``, or ``None`` / ``""`` for the card's ``[runtime]``.
    cache_dir
        Folder of the per-machine timing cache for ``"auto"``; ``None`` times every start.
    budget_s
        ``"auto"`` without a cached ranking: seconds to spend on candidates once one has
        passed (see :data:`AUTO_BUDGET_S`); ``math.inf`` times them all.

    Returns
    -------
    (VolumePredictor, VariantSelection)
        The loaded runtime and what was decided.

    Raises
    ------
    ModelError
        The card has no reference case, the reference case cannot be read, a requested
        variant is unknown, or no candidate passes (not even ``fp32``).
    """
    started = time.perf_counter()
    if spec.verify.file is None:
        raise ModelError(f"{spec.name}: no reference case ([verify] file) to verify against")
    case = VolumeReference.load(spec.directory / spec.verify.file)
    want = requested or spec.runtime.cpu
    names = spec.cpu_candidates(want)
    for name in names:
        spec.variant(name)  # unknown names fail before anything runs
    threads = torch.get_num_threads()
    cache_path = cache_dir / f"{spec.name}.json" if cache_dir is not None else None
    checks: list[VariantCheck] = []
    chosen: VolumePredictor | None = None
    cached = False
    if want == AUTO_VARIANT:
        key = _cache_key(spec, names, threads)
        ranked = _cached_ranking(cache_path, key)
        if ranked is not None:
            names, cached = ranked, True
    timing = want == AUTO_VARIANT and not cached
    slowest_s = 0.0
    for position, name in enumerate(names):
        spent = time.perf_counter() - started
        if timing and chosen is not None and spent + slowest_s > budget_s:
            logger.info(
                "model %s: %.1f s spent verifying; not timed on this machine: %s",
                spec.name,
                spent,
                ", ".join(names[position:]),
            )
            break
        tried = time.perf_counter()
        try:
            runtime = make_runtime(name)
        except ModelError as exc:
            checks.append(VariantCheck(name, False, reason=f"cannot load: {exc}"))
            continue
        if runtime.device != "cpu" and name != REFERENCE_VARIANT:
            checks.append(VariantCheck(name, False, reason="exported variants run on the CPU"))
            continue
        check = check_volume_variant(runtime, spec, case)
        checks.append(check)
        slowest_s = max(slowest_s, time.perf_counter() - tried)
        if not check.ok:
            continue
        if want != AUTO_VARIANT or cached:
            chosen = runtime
            break
        best = min((c for c in checks if c.ok), key=lambda c: c.ms_per_slice or 0.0)
        if best.variant == name:
            chosen = runtime  # the slower runtimes are dropped as they lose
    if chosen is None:
        raise ModelError(
            f"{spec.name}: no variant passes verification on this machine: "
            + "; ".join(c.describe() for c in checks)
        )
    if want == AUTO_VARIANT and not cached and cache_path is not None:
        order = [c.variant for c in sorted(checks, key=lambda c: c.ms_per_slice or 0.0) if c.ok]
        body: dict[str, object] = {"key": key, "model": spec.name, "ranked": order}
        body["checks"] = [asdict(c) for c in checks]
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(cache_path, (json.dumps(body, indent=2) + "\n").encode())
    selection = VariantSelection(
        spec.name,
        chosen.device,
        want,
        chosen.variant,
        tuple(checks),
        True,
        cached,
        time.perf_counter() - started,
    )
    selection.log(logger)
    return chosen, selection


def _cached_ranking(path: Path | None, key: str) -> list[str] | None:
    """The verified variants, fastest first, from a cache written for ``key``."""
    data = read_variant_cache(path, key) if path is not None else None
    if data is None:
        return None
    ranked = data.get("ranked")
    if not isinstance(ranked, list) or not ranked:
        return None
    return [str(n) for n in ranked] + [REFERENCE_VARIANT]
