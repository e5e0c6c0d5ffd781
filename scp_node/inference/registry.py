"""Model cards: ``models/<name>/model.toml`` parsed into a :class:`ModelSpec`.

The card is the contract between a model folder and the node: which series the model wants,
how its input is prepared, what its output labels mean (SNOMED CT codes, colours) and where
its weights are. A hospital can drop in its own folder and the node runs it unchanged.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scp_node.dicom.selection import SeriesRules
from scp_node.errors import ModelError

CARD_FILE = "model.toml"


class _Card(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Card):
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    code: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    meaning: str = Field(min_length=1)


class LabelSpec(_Card):
    """One output label of the model: its value in the label map and its DICOM codes."""

    value: int = Field(ge=1, le=65535)
    name: str = Field(min_length=1)
    category: CodeSpec
    type: CodeSpec
    color: tuple[int, int, int] = (255, 0, 0)
    #: Segmented property type modifier, e.g. laterality (SCT 7771000 Left, 24028007 Right).
    modifier: CodeSpec | None = None
    #: Keep only the label's largest 3-D connected component (nnU-Net's post-processing):
    #: for an organ that is one piece (liver, spleen), never for one in pieces (bowel,
    #: lesions). See :mod:`scp_node.inference.postprocess`.
    largest_component: bool = False


class SeriesSpec(_Card):
    """Which series of a study the model accepts (``[series]``); see :class:`SeriesRules`."""

    modalities: tuple[str, ...] = ("CT",)
    min_slices: int = Field(default=10, ge=1)
    orientation: Literal["axial", "any"] = "axial"
    #: Largest angle between the slice normal and the patient's z axis for "axial".
    max_tilt_deg: float = Field(default=10.0, ge=0, le=90)
    #: Whether DERIVED/SECONDARY images (reformats, software recons) may be segmented.
    accept_derived: bool = False
    #: Accepted BodyPartExamined values (case-insensitive); empty accepts any.
    body_parts: tuple[str, ...] = ()
    #: Regular expression searched (case-insensitive) in SeriesDescription.
    series_description: str | None = None
    #: Inclusive [min, max] SliceThickness in mm.
    slice_thickness_mm: tuple[float, float] | None = None
    #: Each series the rules take is a job of its own, queued once that series has been
    #: quiet for ``settle.series_quiet_s`` while the rest of the study may still arrive.
    #: False: one job per study once the whole study is quiet.
    per_series: bool = False

    @model_validator(mode="after")
    def _valid_rules(self) -> SeriesSpec:
        self.rules()  # the record's own checks (regular expression, thickness range)
        return self

    def rules(self) -> SeriesRules:
        """The rules as the record series selection takes."""
        return SeriesRules(
            modalities=self.modalities,
            min_slices=self.min_slices,
            orientation=self.orientation,
            max_tilt_deg=self.max_tilt_deg,
            accept_derived=self.accept_derived,
            body_parts=self.body_parts,
            series_description=self.series_description,
            slice_thickness_mm=self.slice_thickness_mm,
        )


class InputSpec(_Card):
    """How a volume is turned into the network's input."""

    modality: str = "CT"
    #: In-plane pixel spacing (row, column) in mm the network works at.
    spacing_mm: tuple[float, float] = (3.0, 3.0)
    #: Window (centre, width) in modality units applied before scaling to [0, 1]; CT only.
    window_center: float | None = 50.0
    window_width: float | None = 400.0
    #: Neighbouring slices either side fed as extra channels (2.5-D); 0 means plain 2-D.
    context_slices: int = Field(default=0, ge=0)


class WeightsSpec(_Card):
    """Where the weights are and how to load them."""

    #: ``nnunetv2``: ``file`` is an nnU-Net v2 trained-model folder (set by the card's
    #: ``format = "nnunetv2"``, see :mod:`scp_node.inference.formats.nnunetv2`);
    #: ``monai_bundle``: a MONAI bundle (:mod:`scp_node.inference.formats.monai_bundle`).
    format: Literal["state_dict", "torchscript", "onnx", "nnunetv2", "monai_bundle"] = "state_dict"
    file: str = "weights.pt"
    #: Architecture name from ``scp_node.inference.nets`` (``state_dict`` only).
    architecture: str | None = None
    #: Keyword arguments of the architecture's constructor.
    params: dict[str, Any] = Field(default_factory=dict)
    #: Input height and width are zero-padded (bottom/right) to a multiple of this before
    #: the network runs, and the logits cropped back (exported graphs that cannot pad).
    pad_multiple: int = Field(default=1, ge=1, le=1024)
    #: torch quantized engine a TorchScript int8 file was converted for ("x86", "onednn",
    #: "fbgemm", "qnnpack"); set process-wide before it is loaded.
    quantized_engine: str | None = None
    #: Numeric precision of the weights, for the record ("fp32", "int8", ...).
    precision: str = "fp32"
    #: The ``state_dict`` variant this one was exported or quantised from ("fp32" for
    #: ``[weights]``): start-up verification compares with that network's fp32 output.
    #: ``None``: a ``state_dict`` variant is its own reference, anything else fp32's.
    source: str | None = None
    #: Engine that runs an ``onnx`` variant (slice or volume card): ``ort`` (ONNX Runtime)
    #: or ``openvino`` (OpenVINO's CPU plugin, an optional package).
    engine: Literal["ort", "openvino"] = "ort"

    @model_validator(mode="after")
    def _architecture_needed(self) -> WeightsSpec:
        if self.format == "state_dict" and not self.architecture:
            raise ValueError("weights.architecture is required when weights.format = 'state_dict'")
        return self


class NormalisationSpec(_Card):
    """Intensity normalisation of a volume model (``[volume.normalisation]``).

    ``window``: clip to ``center -/+ width/2`` and scale to [0, 1]; ``zscore``: clip to
    ``clip`` (when given), subtract ``mean``, divide by ``std``; ``percentile``: clip to the
    volume's own ``low``/``high`` percentiles and scale to [0, 1].
    """

    kind: Literal["window", "zscore", "percentile"] = "window"
    center: float = 50.0
    width: float = Field(default=400.0, gt=0)
    clip: tuple[float, float] | None = None
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)
    low: float = Field(default=0.5, ge=0, le=100)
    high: float = Field(default=99.5, ge=0, le=100)


class VolumeSpec(_Card):
    """The 3-D input contract of a ``kind = "volume"`` card in its own format (``[volume]``)."""

    #: Voxel spacing (z, y, x) in mm the network works at.
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    #: Sliding-window patch (z, y, x) in voxels at ``spacing_mm``.
    patch_size: tuple[int, int, int] = (64, 64, 64)
    #: Fraction of a patch neighbouring windows share (nnU-Net's tile step = 1 - overlap).
    overlap: float = Field(default=0.5, ge=0, lt=1)
    #: Array orientation the network was trained in (see :mod:`scp_node.inference.runtime`).
    orientation: Literal["LPS", "RAS"] = "LPS"
    normalisation: NormalisationSpec = NormalisationSpec()


class NnunetSpec(_Card):
    """Which part of an nnU-Net v2 trained-model folder runs (``[nnunet]``)."""

    #: The trainer folder (``<trainer>__<plans>__<configuration>``) holding ``dataset.json``,
    #: ``plans.json`` and ``fold_N/``; relative to the model directory or absolute.
    folder: str = "."
    #: Configuration in ``plans.json``; default: the one the folder name ends with.
    configuration: str | None = None
    folds: tuple[int | Literal["all"], ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    #: Test-time mirroring along the axes the checkpoint allows (8x slower in 3-D).
    mirroring: bool = False
    #: nnU-Net's tile step as a fraction of the patch.
    tile_step_size: float = Field(default=0.5, gt=0, le=1)
    #: Array orientation the folder was trained in: ``RAS`` for NIfTI datasets such as
    #: TotalSegmentator's (voxel axes towards Right, Anterior, Superior); ``LPS`` for
    #: datasets converted from DICOM pixel order.
    orientation: Literal["LPS", "RAS"] = "RAS"


class BundleSpec(_Card):
    """Where a MONAI bundle is and how to read it (``[bundle]``)."""

    #: The bundle root (``configs/``, ``models/``); relative to the model directory.
    folder: str = "."
    #: Inference config relative to the bundle root; default ``configs/inference.json``
    #: (or ``.yaml``).
    config: str | None = None
    #: Axes the network was trained in, for a bundle whose preprocessing has no
    #: ``Orientationd`` (three letters as ``Orientationd``'s axcodes, e.g. ``RAS``).
    orientation: str | None = Field(default=None, pattern=r"^[LRPAISlrpais]{3}$")


#: Variant name that always means the card's ``[weights]`` table.
REFERENCE_VARIANT = "fp32"


#: ``[runtime] cpu`` value that lets the node time the verified variants and run the fastest.
AUTO_VARIANT = "auto"


class RuntimeSpec(_Card):
    """Which variant runs on which device (``[runtime]`` in the card)."""

    #: Variant used on the CPU: ``"fp32"`` (``[weights]``), a key of ``[variants]``, or
    #: ``"auto"`` (the fastest variant that passes start-up verification on this machine).
    cpu: str = REFERENCE_VARIANT
    #: CPU variants in order of preference: when the chosen one fails start-up
    #: verification the next one is tried, ``"fp32"`` always last; ``"auto"`` times these.
    #: Empty: the ``[variants]`` in card order.
    cpu_order: tuple[str, ...] = ()
    #: Variant used on CUDA.
    cuda: str = REFERENCE_VARIANT
    #: Autocast on CUDA: ``"auto"`` (bf16 when the GPU supports it, else fp16), ``"bf16"``,
    #: ``"fp16"`` or ``"none"`` (fp32).
    cuda_autocast: Literal["auto", "bf16", "fp16", "none"] = "auto"


class VerifySpec(_Card):
    """``[verify]``: the reference case every variant is checked against at start-up."""

    #: ``.npz`` next to the card with ``input`` (N, C, rows, columns) float32 at the model
    #: spacing and ``logits`` (N, classes, rows, columns) of the fp32 ``[weights]``;
    #: ``None``: the card has no reference case and variants run unverified.
    file: str | None = None
    #: A variant whose per-label Dice (argmax vs the fp32 reference) is below this for any
    #: label is not used on this machine.
    min_dice: float = Field(default=0.99, ge=0.0, le=1.0)
    #: Optional bound on the largest absolute logit difference; ``None``: reported only.
    max_logit_error: float | None = Field(default=None, gt=0)


class ModelSpec(_Card):
    """A parsed model card plus the folder it came from."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(min_length=1, max_length=16)
    description: str = ""
    #: ``slice``: a 2-D network slice by slice; ``volume``: 3-D sliding window.
    kind: Literal["slice", "volume"] = "slice"
    #: ``card``: weights described by ``[weights]``; ``nnunetv2``: an nnU-Net v2 folder;
    #: ``monai_bundle``: a MONAI bundle.
    format: Literal["card", "nnunetv2", "monai_bundle"] = "card"
    #: Shown as SEG SeriesDescription (max 64 characters).
    series_description: str = Field(default="AI segmentation", max_length=64)
    weights: WeightsSpec
    input: InputSpec = InputSpec()
    series: SeriesSpec = SeriesSpec()
    labels: tuple[LabelSpec, ...] = Field(min_length=1)
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    #: Alternative weights (pruned, int8, exported), by name; ``[weights]`` is ``"fp32"``.
    variants: dict[str, WeightsSpec] = Field(default_factory=dict)
    runtime: RuntimeSpec = RuntimeSpec()
    verify: VerifySpec = VerifySpec()
    volume: VolumeSpec = VolumeSpec()
    nnunet: NnunetSpec | None = None
    bundle: BundleSpec | None = None
    directory: Path = Path(".")

    @model_validator(mode="after")
    def _unique_labels(self) -> ModelSpec:
        values = [label.value for label in self.labels]
        if len(values) != len(set(values)):
            raise ValueError("label values must be unique")
        if REFERENCE_VARIANT in self.variants:
            raise ValueError(f"variant name {REFERENCE_VARIANT!r} is reserved for [weights]")
        for device in ("cpu", "cuda"):
            name = getattr(self.runtime, device)
            if device == "cpu" and name == AUTO_VARIANT:
                continue
            if name != REFERENCE_VARIANT and name not in self.variants:
                raise ValueError(f"runtime.{device} names unknown variant {name!r}")
        for name, weights in self.variants.items():
            if weights.source is not None and weights.source != REFERENCE_VARIANT:
                source = self.variants.get(weights.source)
                if source is None or source.format != "state_dict":
                    raise ValueError(
                        f"variants.{name}.source must name a state_dict variant or 'fp32'"
                    )
        for name in self.runtime.cpu_order:
            if name != REFERENCE_VARIANT and name not in self.variants:
                raise ValueError(f"runtime.cpu_order names unknown variant {name!r}")
        if self.format in ("nnunetv2", "monai_bundle") and self.kind != "volume":
            raise ValueError(f"format = {self.format!r} needs kind = 'volume'")
        return self

    def variant(self, name: str) -> WeightsSpec:
        """The weights of variant ``name`` (``"fp32"``: the ``[weights]`` table).

        Raises
        ------
        ModelError
            No such variant in the card.
        """
        if name == REFERENCE_VARIANT:
            return self.weights
        try:
            return self.variants[name]
        except KeyError:
            known = ", ".join([REFERENCE_VARIANT, *sorted(self.variants)])
            raise ModelError(f"{self.name}: no variant {name!r} (known: {known})") from None

    def reference_of(self, name: str) -> str:
        """The ``state_dict`` variant whose fp32 output variant ``name`` must reproduce."""
        weights = self.variant(name)
        if weights.source is not None:
            return weights.source
        return name if weights.format == "state_dict" else REFERENCE_VARIANT

    def variant_for(self, device_type: str) -> str:
        """Name of the variant the card wants on ``device_type`` (``"cpu"`` or ``"cuda"``).

        For ``cpu = "auto"`` this is the first of :meth:`cpu_candidates` (untimed,
        unverified: :func:`scp_node.inference.verify.select_variant` does both).
        """
        if device_type == "cuda":
            return self.runtime.cuda
        return self.cpu_candidates()[0]

    def cpu_candidates(self, first: str | None = None) -> list[str]:
        """CPU variants in the order they are tried: ``first`` (default: ``runtime.cpu``
        unless it is ``"auto"``), then ``runtime.cpu_order`` (or the ``[variants]`` in card
        order), then ``"fp32"``; no duplicates."""
        first = first if first is not None else self.runtime.cpu
        order = list(self.runtime.cpu_order) or list(self.variants)
        names = [first] if first != AUTO_VARIANT else []
        names += [*order, REFERENCE_VARIANT]
        return list(dict.fromkeys(names))

    @property
    def weights_path(self) -> Path:
        return self.directory / self.weights.file

    @classmethod
    def from_model_dir(cls, directory: Path) -> ModelSpec:
        """Read ``directory/model.toml``.

        Raises
        ------
        ModelError
            The card is missing, not TOML, or invalid (the message names the key), or the
            weights file it names does not exist.
        """
        card = directory / CARD_FILE
        try:
            with card.open("rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError as exc:
            raise ModelError(f"no {CARD_FILE} in {directory}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ModelError(f"{card}: not valid TOML: {exc}") from exc
        raw["directory"] = directory
        if raw.get("format") == "nnunetv2":
            # Imported here: the format module needs nnunetv2, which slice-only nodes lack.
            from scp_node.inference.formats.nnunetv2 import complete_card

            raw = complete_card(card, raw)
        elif raw.get("format") == "monai_bundle":
            # Imported here: reading a bundle needs monai only when a node serves one.
            from scp_node.inference.formats.monai_bundle import complete_card as bundle_card

            raw = bundle_card(card, raw)
        try:
            spec = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                ".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors()
            )
            raise ModelError(f"{card}: {problems}") from exc
        if spec.format in ("nnunetv2", "monai_bundle"):
            return spec  # complete_card checked the folder's files
        if not spec.weights_path.is_file():
            raise ModelError(f"{card}: weights file {spec.weights_path} not found")
        if spec.verify.file is not None and not (directory / spec.verify.file).is_file():
            raise ModelError(f"{card}: verify.file {directory / spec.verify.file} not found")
        for name, variant in spec.variants.items():
            if not (directory / variant.file).is_file():
                raise ModelError(
                    f"{card}: variant {name!r}: file {directory / variant.file} not found"
                )
        return spec


def load_model_spec(models_dir: Path, name: str) -> ModelSpec:
    """The card of model ``name`` under ``models_dir``; raises :class:`ModelError`."""
    return ModelSpec.from_model_dir(models_dir / name)
