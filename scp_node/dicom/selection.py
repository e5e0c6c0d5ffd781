"""Series rules -> which stack of a study a model takes, and why the others not.

Pure logic on the header-only :class:`~scp_node.dicom.volume.Stack` records that
:func:`scp_node.dicom.volume.read_stacks` makes; nothing here reads files, so the model
registry can build :class:`SeriesRules` from a card without importing pydicom.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from scp_node.dicom.volume import Stack
    from scp_node.queue.records import SeriesFacts

__all__ = ["Selection", "SeriesRules", "choose_stack", "route_series", "route_study"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesRules:
    """Which stacks a model accepts (``[series]`` of its model card).

    Attributes
    ----------
    modalities : tuple of str
        Accepted Modality values.
    min_slices : int
        Fewest distinct slice positions a stack must have.
    orientation : {"axial", "any"}
        ``"axial"``: the slice normal may be at most ``max_tilt_deg`` from the patient's
        z axis.
    max_tilt_deg : float
        See ``orientation``.
    accept_derived : bool
        Whether DERIVED or SECONDARY images (reformats, thick recons made by software) may
        be segmented; localizers never are.
    body_parts : tuple of str
        Accepted BodyPartExamined values (case-insensitive); empty accepts any, and a
        series without the attribute is accepted.
    series_description : str or None
        Regular expression searched (case-insensitive) in SeriesDescription; None accepts
        any. A series without a description does not match a pattern.
    slice_thickness_mm : tuple of (float, float) or None
        Inclusive [min, max] SliceThickness in mm; None accepts any, and a series without
        the attribute is accepted.
    """

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = 10
    orientation: Literal["axial", "any"] = "axial"
    max_tilt_deg: float = 10.0
    accept_derived: bool = False
    body_parts: tuple[str, ...] = ()
    series_description: str | None = None
    slice_thickness_mm: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.series_description is not None:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise ValueError(f"series_description is not a regular expression: {exc}") from None
        if self.slice_thickness_mm is not None:
            low, high = self.slice_thickness_mm
            if not 0 <= low <= high:
                raise ValueError(
                    f"slice_thickness_mm must be [min, max] with 0 <= min <= max, "
                    f"not {list(self.slice_thickness_mm)}"
                )
        self._check_basics()

    def _check_basics(self) -> None:
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be at least 1, not {self.min_slices}")
        if not 0 <= self.max_tilt_deg <= 90:
            raise ValueError(f"max_tilt_deg must lie in [0, 90], not {self.max_tilt_deg}")
        if self.orientation not in ("axial", "any"):
            raise ValueError(f"orientation must be 'axial' or 'any', not {self.orientation!r}")


@dataclass(frozen=True)
class Selection:
    """Outcome of :func:`choose_stack`.

    Attributes
    ----------
    stack : Stack or None
        The chosen stack, ``None`` when no stack satisfies the rules.
    rejected : dict of str to str
        Stack name (the Series Instance UID, plus the stack's label when a series holds
        several) -> why it cannot be used (no patient data).
    passed_over : dict of str to str
        Acceptable stacks that lost to ``stack``, and why.
    """

    stack: Stack | None
    rejected: dict[str, str] = field(default_factory=dict)
    passed_over: dict[str, str] = field(default_factory=dict)

    @property
    def series_instance_uid(self) -> str | None:
        """Series Instance UID of the chosen stack."""
        return None if self.stack is None else self.stack.series_instance_uid

    @property
    def warnings(self) -> tuple[str, ...]:
        """What was irregular about the chosen stack (empty when nothing was)."""
        return () if self.stack is None else self.stack.irregularities

    def summary(self) -> str:
        """One line: what was chosen and why, or why nothing was."""
        if self.stack is None:
            parts = [f"{name}: {why}" for name, why in sorted(self.rejected.items())]
            count = len(self.rejected)
            return f"no matching series among {count} stack(s): " + "; ".join(parts)
        chosen = (
            f"{self.stack.name}: {self.stack.slices} slices {self.stack.spacing_mm:.2f} mm apart"
        )
        others = [f"{name}: {why}" for name, why in sorted(self.passed_over.items())]
        others += [f"{name}: {why}" for name, why in sorted(self.rejected.items())]
        return "chose " + chosen + ("; not " + "; not ".join(others) if others else "")


def choose_stack(stacks: Mapping[str, Sequence[Stack] | str], rules: SeriesRules) -> Selection:
    """Pick the stack of a study a model should run on.

    A stack is rejected when its series could not be read or split into stacks (the
    string given for it), it cannot be segmented honestly (:attr:`Stack.refusal`: mixed
    orientations, frames without geometry), it is a localizer, it is derived or secondary
    and ``rules.accept_derived`` is false, its modality is not in ``rules.modalities``,
    it has fewer than ``rules.min_slices`` distinct positions, or (``rules.orientation ==
    "axial"``) its slice normal is tilted more than ``rules.max_tilt_deg`` from the
    patient's z axis. Among the acceptable stacks the one with the most slices wins; a tie
    goes to the smaller slice spacing, then original over derived, then to the smaller
    name (deterministic).

    Parameters
    ----------
    stacks : Mapping of str to (Sequence of Stack or str)
        Series Instance UID -> its stacks, or the reason it could not be read.
    rules : SeriesRules
        The model's rules.

    Returns
    -------
    Selection
        The chosen stack (``None`` when nothing qualifies), every rejection and every
        acceptable stack passed over, with reasons.
    """
    rejected: dict[str, str] = {}
    acceptable: list[Stack] = []
    for uid in sorted(stacks):
        found = stacks[uid]
        if isinstance(found, str):
            rejected[uid] = found
            continue
        for stack in found:
            reason = _assess(stack, rules)
            if reason is None:
                acceptable.append(stack)
            else:
                rejected[stack.name] = reason
    if not acceptable:
        logger.info("no stack matches the rules", extra={"rejected": len(rejected)})
        return Selection(None, rejected)
    ranked = sorted(acceptable, key=lambda s: (-s.slices, s.spacing_mm, s.is_derived, s.name))
    best = ranked[0]
    passed_over = {
        other.name: (
            f"{other.slices} slices, fewer than {best.slices}"
            if other.slices < best.slices
            else f"{other.slices} slices {other.spacing_mm:.2f} mm apart, not finer"
        )
        for other in ranked[1:]
    }
    logger.info(
        "stack chosen: %d slices, %.3f mm apart, %d other candidate(s), %d rejected",
        best.slices,
        best.spacing_mm,
        len(passed_over),
        len(rejected),
        extra={"series_instance_uid": best.series_instance_uid},
    )
    return Selection(best, rejected, passed_over)


def _assess(stack: Stack, rules: SeriesRules) -> str | None:
    """Why ``stack`` is not acceptable, or ``None`` when it is."""
    if stack.refusal is not None:
        return stack.refusal
    if stack.is_localizer:
        return "localizer (ImageType LOCALIZER)"
    if stack.modality not in rules.modalities:
        wanted = ", ".join(rules.modalities)
        return f"modality {stack.modality or '(missing)'} is not one of {wanted}"
    if stack.is_derived and not rules.accept_derived:
        kinds = "\\".join(stack.image_type[:2])
        return f"derived/secondary images (ImageType {kinds}); the model takes original images"
    if rules.orientation == "axial" and stack.tilt_deg > rules.max_tilt_deg:
        return (
            f"not axial: slice normal {stack.tilt_deg:.1f} degrees from the patient z axis "
            f"(at most {rules.max_tilt_deg:g} allowed)"
        )
    if stack.slices < rules.min_slices:
        return f"{stack.slices} distinct slice position(s), at least {rules.min_slices} needed"
    header = stack.headers[0] if stack.headers else None
    if header is None:
        return None
    return _attribute_reason(
        rules,
        _text(header.get("SeriesDescription")),
        _text(header.get("BodyPartExamined")),
        _number(header.get("SliceThickness")),
    )


def _text(value: object) -> str | None:
    return None if value in (None, "") else str(value)


def _number(value: object) -> float | None:
    try:
        return None if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _attribute_reason(
    rules: SeriesRules,
    description: str | None,
    body_part: str | None,
    thickness_mm: float | None,
) -> str | None:
    """Why the header attributes rule a series out (description, body part, thickness)."""
    if rules.series_description is not None and (
        description is None or re.search(rules.series_description, description, re.I) is None
    ):
        # The description may hold patient-adjacent free text: name the rule, not the value.
        return f"series description does not match /{rules.series_description}/"
    wanted_parts = {part.upper() for part in rules.body_parts}
    if wanted_parts and body_part is not None and body_part.upper() not in wanted_parts:
        return f"body part {body_part} is not one of {', '.join(rules.body_parts)}"
    if rules.slice_thickness_mm is not None and thickness_mm is not None:
        low, high = rules.slice_thickness_mm
        if not low <= thickness_mm <= high:
            return f"slice thickness {thickness_mm:g} mm outside [{low:g}, {high:g}] mm"
    return None


def route_series(facts: SeriesFacts, rules: SeriesRules) -> str | None:
    """Why a model's rules rule a series out from what intake recorded, or None.

    The settle-time check: only what the instance rows hold (modality, description, body
    part, slice thickness, orientation of the first instance, frames received). Unknown
    values let the series through; the worker makes the precise choice from the files with
    :func:`choose_stack`, so a series routed here may still be rejected there, never the
    other way round.
    """
    if facts.frame_count == 0:
        return "no image received"
    if facts.modality not in rules.modalities:
        wanted = ", ".join(rules.modalities)
        return f"modality {facts.modality or '(missing)'} is not one of {wanted}"
    if facts.frame_count < rules.min_slices:
        return f"{facts.frame_count} frame(s) received, at least {rules.min_slices} needed"
    if rules.orientation == "axial" and facts.orientation is not None:
        tilt = _tilt_deg(facts.orientation)
        if tilt is not None and tilt > rules.max_tilt_deg:
            return (
                f"not axial: slice normal {tilt:.1f} degrees from the patient z axis "
                f"(at most {rules.max_tilt_deg:g} allowed)"
            )
    return _attribute_reason(
        rules, facts.series_description, facts.body_part_examined, facts.slice_thickness_mm
    )


def route_study(series: Sequence[SeriesFacts], rules: SeriesRules) -> str | None:
    """None when some series of a study may suit the model, else why none does.

    Returns
    -------
    str or None
        ``"no series matches: <uid>: <reason>; ..."`` when every series is ruled out.
    """
    reasons: dict[str, str] = {}
    for facts in series:
        why = route_series(facts, rules)
        if why is None:
            return None
        reasons[facts.series_instance_uid] = why
    if not reasons:
        return "no series received"
    return "no series matches: " + "; ".join(f"{u}: {w}" for u, w in sorted(reasons.items()))


def _tilt_deg(orientation: Sequence[float]) -> float | None:
    """Angle between the slice normal of ``orientation`` and the patient z axis."""
    r, c = orientation[:3], orientation[3:6]
    nz = r[0] * c[1] - r[1] * c[0]
    norm = math.sqrt((r[1] * c[2] - r[2] * c[1]) ** 2 + (r[2] * c[0] - r[0] * c[2]) ** 2 + nz**2)
    if norm == 0:
        return None
    return math.degrees(math.acos(min(1.0, abs(nz) / norm)))
