"""Label map + source volume + its SEG -> measurements and a DICOM SR (TID 1500).

:func:`measure_segments` measures each segment of a SEG on the source grid: its volume in
mL (voxel count x voxel volume from the source spacing) and the mean and standard deviation
of the source values inside it (Hounsfield units for CT; stored values, said so, when the
source carries no rescale). :func:`build_measurement_report` writes them as a TID 1500
Measurement Report (a Comprehensive 3D SR built with :mod:`highdicom.sr`): one volumetric
measurement group per segment, the segment referenced by the SEG's SOP Instance UID and
segment number, the source series referenced, the model as algorithm, the card's codes as
finding type and site.

The SR's UIDs follow :func:`scp_node.output.uids.output_uids` with kind ``"sr"``: one SR
series per (source series, model, version); the instance also depends on the source
instances and on the SEG it references, so a retry rewrites the same SR and an SR about
another SEG (a LABELMAP one, a newer version) is another instance.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from scp_node.dicom.volume import SourceVolume
from scp_node.durable import write_durably
from scp_node.errors import SegmentationError
from scp_node.inference.registry import CodeSpec, ModelSpec
from scp_node.output.seg import MANUFACTURER
from scp_node.output.uids import output_uids

__all__ = [
    "HOUNSFIELD_UNIT",
    "MILLILITER",
    "STORED_VALUE",
    "SegmentMeasurement",
    "build_measurement_report",
    "measure_segments",
    "write_measurement_report",
]

logger = logging.getLogger(__name__)

#: UCUM units of the measurements.
MILLILITER = Code("mL", "UCUM", "milliliter")
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit
#: A UCUM annotation (dimensionless): the source had no rescale, values are as stored.
STORED_VALUE = Code("{stored value}", "UCUM", "stored value (no rescale)")
#: Any other rescaled value whose unit the node cannot name.
NO_UNITS = Code("1", "UCUM", "no units")


@dataclass(frozen=True)
class SegmentMeasurement:
    """What was measured of one segment of a SEG on the source grid.

    ``mean`` and ``standard_deviation`` (population, over the segment's voxels) are in
    ``unit``: Hounsfield units for CT, stored values when the source has no rescale.
    """

    segment_number: int
    label: str
    voxels: int
    volume_ml: float
    mean: float
    standard_deviation: float
    #: UCUM code of ``mean`` and ``standard_deviation``.
    unit: str
    #: Its meaning, for people ("Hounsfield unit", "stored value (no rescale)").
    unit_meaning: str

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict (what the job table keeps and the admin views show)."""
        return {
            "segment_number": self.segment_number,
            "label": self.label,
            "voxels": self.voxels,
            "volume_ml": self.volume_ml,
            "mean": self.mean,
            "standard_deviation": self.standard_deviation,
            "unit": self.unit,
            "unit_meaning": self.unit_meaning,
        }


def _rescaled(volume: SourceVolume) -> bool:
    """Whether the source's stored values went through a modality rescale."""
    for ds in volume.datasets:
        if "RescaleSlope" in ds or "RescaleIntercept" in ds:
            return True
        for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            for item in ds.get(groups, [])[:1]:
                if "PixelValueTransformationSequence" in item:
                    return True
    return False


def _value_unit(volume: SourceVolume) -> Code:
    if not _rescaled(volume):
        return STORED_VALUE
    return HOUNSFIELD_UNIT if volume.modality == "CT" else NO_UNITS


def measure_segments(
    volume: SourceVolume, labelmap: np.ndarray, spec: ModelSpec
) -> tuple[SegmentMeasurement, ...]:
    """Measure every label of ``spec`` that has a voxel, numbered as its SEG segment.

    Segment numbers follow :func:`scp_node.output.seg.build_segmentation`: 1..n in the
    card's label order, labels without a voxel skipped. A segment of one voxel is still
    measured (its standard deviation is 0).

    Parameters
    ----------
    volume : SourceVolume
        The source stack (values rescaled, HU for CT) and its spacing.
    labelmap : numpy.ndarray
        Shape ``volume.array.shape``; 0 or a ``LabelSpec.value`` of ``spec``.
    spec : ModelSpec
        The model card (label names and order).

    Returns
    -------
    tuple of SegmentMeasurement
        Empty when no label has a voxel.

    Raises
    ------
    SegmentationError
        ``labelmap`` does not have the volume's shape.
    """
    if labelmap.shape != volume.array.shape:
        raise SegmentationError(
            f"labelmap has shape {labelmap.shape}, the volume {volume.array.shape}"
        )
    voxel_ml = float(np.prod(volume.spacing_zyx)) / 1000.0
    unit = _value_unit(volume)
    stats = _label_statistics(volume.array, labelmap, [label.value for label in spec.labels])
    found: list[SegmentMeasurement] = []
    for label in spec.labels:
        count, mean, m2 = stats[label.value]
        if count == 0:
            continue
        found.append(
            SegmentMeasurement(
                segment_number=len(found) + 1,
                label=label.name,
                voxels=count,
                volume_ml=count * voxel_ml,
                mean=mean,
                standard_deviation=float(np.sqrt(m2 / count)),
                unit=unit.value,
                unit_meaning=unit.meaning,
            )
        )
    return tuple(found)


#: Slices per step when measuring: bounds the masks to a few MiB for any study size.
_CHUNK_SLICES = 16


def _label_statistics(
    image: np.ndarray, labelmap: np.ndarray, values: list[int]
) -> dict[int, tuple[int, float, float]]:
    """Per label value: (voxel count, mean, sum of squared deviations) of ``image``.

    Slab by slab, the slabs' statistics combined exactly (Chan et al.'s pairwise update),
    so no volume-sized mask or float copy is made.
    """
    stats = {value: (0, 0.0, 0.0) for value in values}
    for start in range(0, labelmap.shape[0], _CHUNK_SLICES):
        labels = labelmap[start : start + _CHUNK_SLICES]
        slab = image[start : start + _CHUNK_SLICES]
        for value in values:
            mask = labels == value
            n_b = int(np.count_nonzero(mask))
            if n_b == 0:
                continue
            chunk = slab[mask].astype(np.float64)
            mean_b = float(chunk.mean())
            m2_b = float(np.square(chunk - mean_b).sum())
            n_a, mean_a, m2_a = stats[value]
            n = n_a + n_b
            delta = mean_b - mean_a
            stats[value] = (
                n,
                mean_a + delta * n_b / n,
                m2_a + m2_b + delta * delta * n_a * n_b / n,
            )
    return stats


def _coded(code: CodeSpec) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.code, scheme_designator=code.scheme, meaning=code.meaning)


def _derived_uid(*parts: str) -> str:
    # Tracking and device UIDs inside the SR: stable, so a rebuilt SR has the same content.
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts)).int}"


_VALUE_NAMES: dict[str, Code] = {
    "CT": codes.DCM.AttenuationCoefficient,
    "MR": codes.DCM.MRSignalIntensity,
}


def _value_name(modality: str) -> Code:
    """What the mean and SD are of: attenuation (CT), MR signal, else a plain quantity."""
    return _VALUE_NAMES.get(modality, Code("246205007", "SCT", "Quantity"))


def build_measurement_report(
    volume: SourceVolume,
    seg: Dataset,
    measurements: Sequence[SegmentMeasurement],
    spec: ModelSpec,
    *,
    software_version: str,
    series_number: int = 9903,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of ``seg``'s segments.

    Parameters
    ----------
    volume : SourceVolume
        The source stack the segments were measured on (its headers are the evidence).
    seg : pydicom.dataset.Dataset
        The SEG the measurements belong to (a header is enough): the report references
        its segments by its SOP Class/Instance UID and segment number.
    measurements : sequence of SegmentMeasurement
        From :func:`measure_segments`; each ``segment_number`` must be a segment of
        ``seg`` whose label is a label of ``spec``.
    spec : ModelSpec
        The model (algorithm name and version, label codes).
    software_version : str
        The node's version, written as SoftwareVersions.
    series_number, instance_number : int, optional
        SeriesNumber and InstanceNumber of the report.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The report, final but not verified (no human signed it), complete.

    Raises
    ------
    SegmentationError
        ``measurements`` is empty, names a segment or label ``seg``/``spec`` lacks, or
        highdicom refused the content (the message says why).
    """
    if not measurements:
        raise SegmentationError("no measurement: a report needs at least one segment")
    segments = {int(item.SegmentNumber): item for item in seg.get("SegmentSequence", [])}
    labels = {label.name: label for label in spec.labels}
    seg_uid = str(seg.SOPInstanceUID)
    uids = output_uids(
        "sr",
        source_series_instance_uid=volume.series_instance_uid,
        model_name=spec.name,
        model_version=spec.version,
        # The SEG is an input too: a report about another SEG is another instance.
        source_sop_instance_uids=[*(str(ds.SOPInstanceUID) for ds in volume.datasets), seg_uid],
    )
    algorithm = hd.sr.AlgorithmIdentification(name=spec.name, version=spec.version)
    unit_of = {HOUNSFIELD_UNIT.value: HOUNSFIELD_UNIT, STORED_VALUE.value: STORED_VALUE}
    value_name = _value_name(volume.modality)
    try:
        groups = []
        for m in measurements:
            if m.segment_number not in segments or m.label not in labels:
                raise SegmentationError(
                    f"segment {m.segment_number} ({m.label}) is not a segment of SEG {seg_uid} "
                    f"with a label of model {spec.name}"
                )
            label = labels[m.label]
            unit = unit_of.get(m.unit, NO_UNITS)
            site = hd.sr.FindingSite(_coded(label.type), laterality=_laterality(label.modifier))
            values = [
                hd.sr.Measurement(
                    name=codes.SCT.Volume,
                    value=m.volume_ml,
                    unit=MILLILITER,
                    algorithm_id=algorithm,
                ),
                hd.sr.Measurement(
                    name=value_name,
                    value=m.mean,
                    unit=unit,
                    derivation=codes.SCT.Mean,
                    algorithm_id=algorithm,
                ),
                hd.sr.Measurement(
                    name=value_name,
                    value=m.standard_deviation,
                    unit=unit,
                    derivation=codes.SCT.StandardDeviation,
                    algorithm_id=algorithm,
                ),
            ]
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=_derived_uid(uids.sop_instance_uid, str(m.segment_number)),
                        identifier=f"{m.label} (segment {m.segment_number})"[:64],
                    ),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=str(seg.SOPClassUID),
                        sop_instance_uid=seg_uid,
                        segment_number=m.segment_number,
                        source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
                    ),
                    finding_type=_coded(label.type),
                    finding_category=_coded(label.category),
                    finding_sites=[site],
                    algorithm_id=algorithm,
                    measurements=values,
                )
            )
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=_derived_uid("scp-node device", spec.name, spec.version),
                name=spec.name,
                manufacturer_name=MANUFACTURER,
                model_name=spec.name,
            ),
        )
        procedure = (
            codes.LN.CTUnspecifiedBodyRegion if volume.modality == "CT" else codes.SCT.Imaging
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=procedure,
            imaging_measurements=groups,
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*volume.datasets, seg],
            content=report[0],
            series_instance_uid=uids.series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uids.sop_instance_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=True,
            series_description=f"{spec.series_description} measurements"[:64],
            manufacturer_model_name=spec.name,
            software_versions=software_version,
            device_serial_number=MANUFACTURER,
        )
    except SegmentationError:
        raise
    except Exception as exc:  # highdicom raises ValueError, TypeError, AttributeError, ...
        raise SegmentationError(
            f"cannot build the measurement report of model {spec.name} {spec.version}: {exc}"
        ) from exc
    logger.info(
        "SR built: %d measurement group(s)",
        len(groups),
        extra={"series_instance_uid": volume.series_instance_uid, "sop_instance_uid": seg_uid},
    )
    return sr


def _laterality(modifier: CodeSpec | None) -> hd.sr.CodedConcept | None:
    # The card's only modifiers are lateralities (SCT Left/Right); anything else is not a
    # laterality and stays out of the finding site.
    if modifier is None or modifier.scheme != "SCT" or modifier.code not in _LATERALITIES:
        return None
    return _coded(modifier)


_LATERALITIES = frozenset({"7771000", "24028007", "51440002"})


def write_measurement_report(sr: Dataset, path: Path) -> None:
    """Write ``sr`` durably to ``path`` (``.part``, fsync, rename; the parent must exist).

    Raises
    ------
    SegmentationError
        The file cannot be written (the message names the path); no ``.part`` is left.
    """
    try:
        write_durably(path, lambda handle: sr.save_as(handle, enforce_file_format=True))
    except (OSError, ValueError) as exc:
        raise SegmentationError(f"cannot write SR to {path}: {exc}") from exc
    logger.info("SR written", extra={"sop_instance_uid": str(sr.SOPInstanceUID)})
