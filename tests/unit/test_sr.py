"""TID 1500 measurement reports (and LABELMAP SEGs) built on subject B's real CT slices,
written, read back with highdicom and validated with dciodvfy."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from scp_node.dicom.volume import SourceVolume, load_volume
from scp_node.errors import SegmentationError
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation
from scp_node.output.sr import (
    SegmentMeasurement,
    build_measurement_report,
    measure_segments,
    write_measurement_report,
)
from tests.support.validators import check_with_dciodvfy

ANATOMY = {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
LIVER = {"code": "10200004", "scheme": "SCT", "meaning": "Liver"}
KIDNEY = {"code": "64033007", "scheme": "SCT", "meaning": "Kidney"}
LEFT = {"code": "7771000", "scheme": "SCT", "meaning": "Left"}


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "liver-unet.v1",
            "version": "1.2.0",
            "series_description": "AI liver segmentation",
            "weights": {"architecture": "unet"},
            "labels": [
                {"value": 1, "name": "Liver", "category": ANATOMY, "type": LIVER},
                {"value": 2, "name": "Spleen", "category": ANATOMY, "type": LIVER},
                {
                    "value": 3,
                    "name": "Left kidney",
                    "category": ANATOMY,
                    "type": KIDNEY,
                    "modifier": LEFT,
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def volume(ct_b_files: list[Path]) -> SourceVolume:
    return load_volume(ct_b_files)


def _labelmap(volume: SourceVolume) -> np.ndarray:
    """A box of label 1 over slices 5-11, a 3-voxel label 3; label 2 absent."""
    labelmap = np.zeros(volume.array.shape, dtype=np.uint8)
    labelmap[5:12, 180:300, 120:260] = 1
    labelmap[15, 40, 40:43] = 3
    return labelmap


@pytest.fixture(scope="module")
def built(
    volume: SourceVolume, spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, tuple[SegmentMeasurement, ...]]:
    folder = tmp_path_factory.mktemp("sr")
    labelmap = _labelmap(volume)
    seg = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    assert seg is not None
    seg_path = folder / "seg.dcm"
    write_segmentation(seg, seg_path)
    measurements = measure_segments(volume, labelmap, spec)
    sr = build_measurement_report(volume, seg, measurements, spec, software_version="0.1.0")
    sr_path = folder / "sr.dcm"
    write_measurement_report(sr, sr_path)
    return seg_path, sr_path, measurements


def _groups(sr_path: Path) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    report = hd.sr.srread(sr_path)
    return list(report.content.get_volumetric_roi_measurement_groups())


def _values(group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations) -> dict[str, float]:
    """Measurement values by derivation ("Volume" for the volume), from the SR alone."""
    found: dict[str, float] = {}
    for m in group.get_measurements():
        key = m.name.meaning if m.derivation is None else m.derivation.meaning
        found[key] = float(m.value)
    return found


def test_dciodvfy_reports_no_error(built: tuple[Path, Path, object]) -> None:
    check_with_dciodvfy(built[1], "Comprehensive3DSR")


def test_one_group_per_segment_referencing_the_seg_by_uid_and_number(
    built: tuple[Path, Path, object], volume: SourceVolume
) -> None:
    seg_path, sr_path, _ = built
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    sr = pydicom.dcmread(sr_path)
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == seg.StudyInstanceUID
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    groups = _groups(sr_path)
    assert [g.tracking_identifier for g in groups] == [
        "Liver (segment 1)",
        "Left kidney (segment 2)",
    ]
    for number, group in enumerate(groups, start=1):
        (segment_ref, *_rest) = group.referenced_segment
        (item,) = segment_ref.ReferencedSOPSequence
        assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert item.ReferencedSOPClassUID == seg.SOPClassUID
        assert int(item.ReferencedSegmentNumber) == number
        sources = [c for c in group.referenced_segment if c.ValueType == "UIDREF"]
        assert [c.UID for c in sources] == [volume.series_instance_uid]
    # The source series and the SEG are the SR's evidence.
    evidence = {
        str(series.SeriesInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
    }
    assert evidence == {volume.series_instance_uid, str(seg.SeriesInstanceUID)}


def test_finding_site_and_algorithm_come_from_the_card(built: tuple[Path, Path, object]) -> None:
    liver, kidney = _groups(built[1])
    (site,) = liver.finding_sites
    assert (site.value.value, site.value.scheme_designator) == ("10200004", "SCT")
    assert liver.finding_type.value == "10200004"
    (kidney_site,) = kidney.finding_sites
    assert kidney_site.value.value == "64033007"
    assert kidney_site.laterality is not None and kidney_site.laterality.value == "7771000"
    sr = pydicom.dcmread(built[1])
    texts = [str(ds.TextValue) for ds in _walk(sr.ContentSequence) if ds.get("ValueType") == "TEXT"]
    assert "liver-unet.v1" in texts and "1.2.0" in texts


def _walk(items: pydicom.Sequence) -> list[pydicom.Dataset]:
    found: list[pydicom.Dataset] = []
    for item in items:
        found.append(item)
        found.extend(_walk(item.get("ContentSequence", [])))
    return found


def test_volume_is_the_segs_own_voxel_count_times_its_voxel_volume(
    built: tuple[Path, Path, object], volume: SourceVolume
) -> None:
    seg_path, sr_path, _ = built
    seg = hd.seg.segread(seg_path)
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    rows_mm, columns_mm = (float(v) for v in measures.PixelSpacing)
    # Slice spacing from the SEG's own frame positions, not from our volume.
    positions = sorted(
        {
            float(frame.PlanePositionSequence[0].ImagePositionPatient[2])
            for frame in seg.PerFrameFunctionalGroupsSequence
        }
    )
    (slice_mm,) = {round(b - a, 4) for a, b in pairwise(positions)}
    voxel_ml = rows_mm * columns_mm * slice_mm / 1000.0
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    for number, group in enumerate(_groups(sr_path), start=1):
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number]
        )
        voxels = int(np.count_nonzero(pixels))
        assert _values(group)["Volume"] == pytest.approx(voxels * voxel_ml, rel=1e-9)
    # The 3-voxel segment is still reported, with its volume.
    assert _values(_groups(sr_path)[1])["Volume"] == pytest.approx(3 * voxel_ml)


def test_mean_and_sd_are_hounsfield_units_of_the_source_files(
    built: tuple[Path, Path, object], ct_b_files: list[Path]
) -> None:
    # The source values read with pydicom alone (rescale applied), in slice order.
    datasets = sorted(
        (pydicom.dcmread(path) for path in ct_b_files),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    hu = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in datasets]).astype(float)
    inside = hu[5:12, 180:300, 120:260]
    liver = _values(_groups(built[1])[0])
    assert liver["Mean"] == pytest.approx(float(inside.mean()), abs=1e-6)
    assert liver["Standard Deviation"] == pytest.approx(float(inside.std()), abs=1e-6)
    report = hd.sr.srread(built[1])
    group = report.content.get_volumetric_roi_measurement_groups()[0]
    units = {m.unit.value for m in group.get_measurements()}
    assert units == {"mL", "[hnsf'U]"}


def test_a_source_without_rescale_is_reported_in_stored_values(
    ct_b_files: list[Path], spec: ModelSpec, tmp_path: Path
) -> None:
    for path in ct_b_files:
        ds = pydicom.dcmread(path)
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(tmp_path / path.name)
    volume = load_volume(sorted(tmp_path.glob("*.dcm")))
    labelmap = _labelmap(volume)
    (liver, _kidney) = measure_segments(volume, labelmap, spec)
    assert liver.unit == "{stored value}"
    stored = np.stack(
        [
            pydicom.dcmread(p).pixel_array
            for p in sorted(
                tmp_path.glob("*.dcm"),
                key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]),
            )
        ]
    )
    assert liver.mean == pytest.approx(float(stored[5:12, 180:300, 120:260].mean()), abs=1e-6)
    seg = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    assert seg is not None
    sr = build_measurement_report(volume, seg, (liver,), spec, software_version="0.1.0")
    path = tmp_path / "sr.dcm"
    write_measurement_report(sr, path)
    check_with_dciodvfy(path, "Comprehensive3DSR")
    (group,) = _groups(path)
    units = {m.unit.value: m.unit.meaning for m in group.get_measurements()}
    assert units["{stored value}"] == "stored value (no rescale)"


def test_uids_are_deterministic_and_follow_the_referenced_seg(
    volume: SourceVolume, spec: ModelSpec
) -> None:
    labelmap = _labelmap(volume)
    measurements = measure_segments(volume, labelmap, spec)
    binary = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    labelmap_seg = build_segmentation(
        volume, labelmap, spec, software_version="0.1.0", seg_type="labelmap"
    )
    assert binary is not None and labelmap_seg is not None

    def report(seg: pydicom.Dataset) -> hd.sr.Comprehensive3DSR:
        return build_measurement_report(volume, seg, measurements, spec, software_version="1")

    first, again, other = report(binary), report(binary), report(labelmap_seg)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert other.SeriesInstanceUID == first.SeriesInstanceUID
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert first.SeriesInstanceUID != binary.SeriesInstanceUID

    def tracking(sr: pydicom.Dataset) -> list[str]:
        return [
            str(item.UID)
            for item in _walk(sr.ContentSequence)
            if item.get("ValueType") == "UIDREF"
            and item.ConceptNameCodeSequence[0].CodeValue == "112040"  # Tracking UID
        ]

    assert len(tracking(first)) == 2
    assert tracking(first) == tracking(again)


def test_report_refuses_what_the_seg_lacks(volume: SourceVolume, spec: ModelSpec) -> None:
    labelmap = _labelmap(volume)
    seg = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    assert seg is not None
    (liver, _kidney) = measure_segments(volume, labelmap, spec)
    with pytest.raises(SegmentationError, match="at least one segment"):
        build_measurement_report(volume, seg, (), spec, software_version="1")
    with pytest.raises(SegmentationError, match="segment 7"):
        build_measurement_report(
            volume, seg, (replace(liver, segment_number=7),), spec, software_version="1"
        )


def test_measure_segments_numbers_like_the_seg(volume: SourceVolume, spec: ModelSpec) -> None:
    labelmap = _labelmap(volume)
    measured = measure_segments(volume, labelmap, spec)
    seg = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    assert seg is not None
    assert [(m.segment_number, m.label) for m in measured] == [
        (int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence
    ]
    assert [m.voxels for m in measured] == [7 * 120 * 140, 3]
    assert measure_segments(volume, np.zeros_like(labelmap), spec) == ()
    with pytest.raises(SegmentationError, match="shape"):
        measure_segments(volume, labelmap[:3], spec)


def test_labelmap_seg_is_another_instance_of_the_same_series_with_the_same_pixels(
    volume: SourceVolume, spec: ModelSpec, tmp_path: Path
) -> None:
    labelmap = _labelmap(volume)
    binary = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    lm = build_segmentation(volume, labelmap, spec, software_version="0.1.0", seg_type="labelmap")
    assert binary is not None and lm is not None
    assert lm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert lm.SegmentationType == "LABELMAP"
    assert lm.SeriesInstanceUID == binary.SeriesInstanceUID
    assert lm.SOPInstanceUID != binary.SOPInstanceUID
    again = build_segmentation(
        volume, labelmap, spec, software_version="0.1.0", seg_type="labelmap"
    )
    assert again is not None and again.SOPInstanceUID == lm.SOPInstanceUID
    path = tmp_path / "lm.dcm"
    write_segmentation(lm, path)
    read = hd.seg.segread(path)
    assert int(read.NumberOfFrames) == labelmap.shape[0]
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    for number, value in ((1, 1), (2, 3)):
        pixels = read.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number]
        )
        assert np.array_equal(pixels[..., 0] > 0, labelmap == value)
