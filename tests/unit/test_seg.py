"""DICOM SEG built on subject B's real CT slices, written, read back and validated."""

from __future__ import annotations

import tracemalloc
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from scp_node.dicom.volume import SourceVolume, load_volume
from scp_node.errors import SegmentationError
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import (
    build_segmentation,
    content_label_for,
    write_segmentation,
)
from scp_node.output.uids import OutputUids, output_uids
from tests.support.validators import check_with_dciodvfy

ANATOMY = {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
#: The box of label 1: source slices with z in this range (mm), rows and columns below.
BOX_Z_MM = (-795.0, -783.0)
BOX_ROWS = slice(180, 300)
BOX_COLUMNS = slice(120, 260)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "liver-unet.v1",
            "version": "1.2.0",
            "series_description": "AI liver segmentation",
            "weights": {"architecture": "unet"},
            "labels": [
                {
                    "value": 1,
                    "name": "Liver",
                    "category": ANATOMY,
                    "type": {"code": "10200004", "scheme": "SCT", "meaning": "Liver"},
                    "color": [221, 130, 101],
                },
                {
                    "value": 2,
                    "name": "Spleen",
                    "category": ANATOMY,
                    "type": {"code": "78961009", "scheme": "SCT", "meaning": "Spleen"},
                    "color": [157, 108, 162],
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def volume(ct_b_files: list[Path]) -> SourceVolume:
    return load_volume(ct_b_files)


@pytest.fixture(scope="module")
def sources(ct_b_files: list[Path]) -> dict[str, pydicom.Dataset]:
    """The source files read with pydicom alone, by SOP Instance UID."""
    datasets = (pydicom.dcmread(path, stop_before_pixels=True) for path in ct_b_files)
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _in_box_slice(z: float) -> bool:
    return BOX_Z_MM[0] <= z <= BOX_Z_MM[1]


def _box_labelmap(volume: SourceVolume) -> np.ndarray:
    labelmap = np.zeros(volume.array.shape, dtype=np.uint8)
    for index, ds in enumerate(volume.datasets):
        if _in_box_slice(float(ds.ImagePositionPatient[2])):
            labelmap[index, BOX_ROWS, BOX_COLUMNS] = 1
    assert 0 < labelmap.any(axis=(1, 2)).sum() < len(volume.datasets)
    return labelmap


@pytest.fixture(scope="module")
def written(
    volume: SourceVolume, spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    seg = build_segmentation(volume, _box_labelmap(volume), spec, software_version="0.1.0")
    assert seg is not None
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    write_segmentation(seg, path)
    return path


def _floats(values: Any) -> list[float]:
    return [float(v) for v in values]


def test_segment_descriptions(written: Path, spec: ModelSpec) -> None:
    seg = hd.seg.segread(written)
    assert seg.segment_numbers == [1]
    description = seg.get_segment_description(1)
    assert description.segment_label == "Liver"
    assert description.segmented_property_type.value == "10200004"
    assert description.segmented_property_type.scheme_designator == "SCT"
    assert description.segmented_property_category.value == "123037004"
    assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = description.algorithm_identification
    assert algorithm is not None
    assert algorithm[0].AlgorithmName == spec.name
    assert algorithm[0].AlgorithmVersion == spec.version
    assert algorithm[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    colour = hd.color.CIELabColor.from_dicom_value(
        tuple(pydicom.dcmread(written).SegmentSequence[0].RecommendedDisplayCIELabValue)
    )
    assert colour.to_rgb() == pytest.approx((221, 130, 101), abs=1)


def test_header(written: Path, spec: ModelSpec, sources: dict[str, pydicom.Dataset]) -> None:
    ds = pydicom.dcmread(written)
    source = next(iter(sources.values()))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    assert ds.Manufacturer == "scp-node"
    assert ds.ManufacturerModelName == spec.name
    assert ds.DeviceSerialNumber == "scp-node"
    assert ds.SoftwareVersions == "0.1.0"
    assert ds.SeriesDescription == "AI liver segmentation"
    assert ds.ContentLabel == "LIVER_UNET_V1"
    assert ds.SeriesNumber == 9901
    assert ds.InstanceNumber == 1
    assert OutputUids(ds.SeriesInstanceUID, ds.SOPInstanceUID) == output_uids(
        "seg",
        source_series_instance_uid=source.SeriesInstanceUID,
        model_name=spec.name,
        model_version=spec.version,
        source_sop_instance_uids=sources,
    )
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)


def test_frames_lie_on_the_source_slices(
    written: Path, sources: dict[str, pydicom.Dataset]
) -> None:
    ds = pydicom.dcmread(written)
    assert ds.NumberOfFrames == len(sources) == 20
    shared = ds.SharedFunctionalGroupsSequence[0]
    any_source = next(iter(sources.values()))
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert _floats(orientation) == pytest.approx(_floats(any_source.ImageOrientationPatient))
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    assert _floats(spacing) == pytest.approx(_floats(any_source.PixelSpacing))

    pixels = ds.pixel_array
    assert pixels.shape == (20, any_source.Rows, any_source.Columns)
    seen = set()
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        source_uid = str(
            frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        )
        seen.add(source_uid)
        position = _floats(frame.PlanePositionSequence[0].ImagePositionPatient)
        assert position == pytest.approx(_floats(sources[source_uid].ImagePositionPatient))
        expected = np.zeros((any_source.Rows, any_source.Columns), dtype=np.uint8)
        if _in_box_slice(position[2]):
            expected[BOX_ROWS, BOX_COLUMNS] = 1
        np.testing.assert_array_equal(pixels[index], expected)
    assert seen == set(sources)


def test_references_every_source_instance(
    written: Path, sources: dict[str, pydicom.Dataset]
) -> None:
    ds = pydicom.dcmread(written)
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == next(iter(sources.values())).SeriesInstanceUID
    referenced = {str(item.ReferencedSOPInstanceUID) for item in series.ReferencedInstanceSequence}
    assert referenced == set(sources)


def test_highdicom_reads_pixels_by_source_instance(
    written: Path, sources: dict[str, pydicom.Dataset]
) -> None:
    seg = hd.seg.segread(written)
    uids = sorted(sources, key=lambda uid: float(sources[uid].ImagePositionPatient[2]))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    assert pixels.shape == (20, 512, 512, 1)
    for uid, plane in zip(uids, pixels[..., 0], strict=True):
        assert plane.any() == _in_box_slice(float(sources[uid].ImagePositionPatient[2]))


def test_dciodvfy_reports_no_error(written: Path) -> None:
    check_with_dciodvfy(written, "Segmentation")


def test_the_dciodvfy_check_fails_on_a_broken_seg(written: Path, tmp_path: Path) -> None:
    """The check above can fail: a SEG without a Type 1 attribute, and no file at all."""
    broken = pydicom.dcmread(written)
    del broken.SegmentSequence[0].SegmentLabel
    broken.save_as(tmp_path / "broken.dcm")
    with pytest.raises(AssertionError, match="SegmentLabel"):
        check_with_dciodvfy(tmp_path / "broken.dcm", "Segmentation")
    with pytest.raises(AssertionError, match="did not verify"):
        check_with_dciodvfy(tmp_path / "absent.dcm", "Segmentation")


def test_write_leaves_no_part_file(written: Path) -> None:
    assert written.is_file()
    assert not list(written.parent.glob("*.part"))


def test_uids_are_stable_across_builds(volume: SourceVolume, spec: ModelSpec) -> None:
    labelmap = _box_labelmap(volume)
    first = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    second = build_segmentation(volume, labelmap, spec, software_version="0.1.1")
    assert first is not None and second is not None
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID == second.SOPInstanceUID


def _uids(kind: str = "seg", sources: tuple[str, ...] = ("1.2.3.1", "1.2.3.2")) -> OutputUids:
    return output_uids(
        kind,  # type: ignore[arg-type]  # a str, as a caller's typo would be
        source_series_instance_uid="1.2.3",
        model_name="liver",
        model_version="1.0",
        source_sop_instance_uids=sources,
    )


def test_output_uids_are_valid_and_stable() -> None:
    uids = _uids()
    assert uids.series_instance_uid != uids.sop_instance_uid
    assert uids == _uids()
    # Order and repetitions of the source instances do not matter, only their set.
    assert uids == _uids(sources=("1.2.3.2", "1.2.3.1", "1.2.3.2"))
    for uid in (uids.series_instance_uid, uids.sop_instance_uid):
        assert uid.startswith("2.25.")
        assert len(uid) <= 64
        assert pydicom.uid.UID(uid).is_valid


def test_output_uids_series_and_model_change_both_uids() -> None:
    uids = _uids()
    for changed in (
        output_uids(
            "seg",
            source_series_instance_uid="1.2.4",
            model_name="liver",
            model_version="1.0",
            source_sop_instance_uids=("1.2.3.1", "1.2.3.2"),
        ),
        output_uids(
            "seg",
            source_series_instance_uid="1.2.3",
            model_name="liver",
            model_version="1.1",
            source_sop_instance_uids=("1.2.3.1", "1.2.3.2"),
        ),
    ):
        assert changed.series_instance_uid != uids.series_instance_uid
        assert changed.sop_instance_uid != uids.sop_instance_uid


def test_output_uids_one_instance_more_or_less_is_a_new_instance_in_the_same_series() -> None:
    uids = _uids()
    for sources in (("1.2.3.1",), ("1.2.3.1", "1.2.3.2", "1.2.3.3")):
        other = _uids(sources=sources)
        assert other.series_instance_uid == uids.series_instance_uid
        assert other.sop_instance_uid != uids.sop_instance_uid


def test_output_uids_kind_changes_both_uids() -> None:
    seg, kos = _uids("seg"), _uids("kos")
    assert kos.series_instance_uid != seg.series_instance_uid
    assert kos.sop_instance_uid != seg.sop_instance_uid
    with pytest.raises(ValueError, match="kind"):
        _uids("SEG")
    with pytest.raises(ValueError, match="empty"):
        _uids(sources=())


def test_seg_series_uid_is_the_one_earlier_versions_wrote() -> None:
    # The SEG Series Instance UID the node derived before source instances were part of the
    # key (name-based UUID of ["scp-node SEG series", series, model, version]), so SEG series
    # already in a PACS continue with the next version.
    key = '["scp-node SEG series", "1.2.3", "liver", "1.0"]'
    assert _uids().series_instance_uid == f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, key).int}"


def test_seg_of_fewer_slices_is_a_new_instance_in_the_same_series(
    volume: SourceVolume, spec: ModelSpec, ct_b_files: list[Path]
) -> None:
    labelmap = _box_labelmap(volume)
    full = build_segmentation(volume, labelmap, spec, software_version="0.1.0")
    part = load_volume(ct_b_files[:14])
    partial = build_segmentation(part, _box_labelmap(part), spec, software_version="0.1.0")
    assert full is not None and partial is not None
    assert partial.NumberOfFrames == 14
    assert partial.SeriesInstanceUID == full.SeriesInstanceUID
    assert partial.SOPInstanceUID != full.SOPInstanceUID


def test_instance_number_and_content_time(volume: SourceVolume, spec: ModelSpec) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    seg = build_segmentation(
        volume, _box_labelmap(volume), spec, software_version="0.1.0", instance_number=3
    )
    after = datetime.now(UTC)
    assert seg is not None
    assert seg.InstanceNumber == 3
    content = datetime.strptime(
        f"{seg.ContentDate}{str(seg.ContentTime).split('.')[0]}", "%Y%m%d%H%M%S"
    ).replace(tzinfo=UTC)
    assert before <= content <= after
    with pytest.raises(SegmentationError, match="instance_number"):
        build_segmentation(
            volume, _box_labelmap(volume), spec, software_version="0.1.0", instance_number=0
        )


def test_empty_labelmap_gives_none(volume: SourceVolume, spec: ModelSpec) -> None:
    labelmap = np.zeros(volume.array.shape, dtype=np.uint8)
    assert build_segmentation(volume, labelmap, spec, software_version="0.1.0") is None


def test_segments_follow_label_order_and_skip_absent_labels(
    volume: SourceVolume, spec: ModelSpec
) -> None:
    only_spleen = np.zeros(volume.array.shape, dtype=np.int16)
    only_spleen[3, 10:20, 10:20] = 2
    seg = build_segmentation(volume, only_spleen, spec, software_version="0.1.0")
    assert seg is not None
    assert [item.SegmentNumber for item in seg.SegmentSequence] == [1]
    assert seg.SegmentSequence[0].SegmentLabel == "Spleen"
    assert seg.NumberOfFrames == 20

    both = only_spleen.copy()
    both[5, 100:120, 100:120] = 1
    seg = build_segmentation(volume, both, spec, software_version="0.1.0")
    assert seg is not None
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["Liver", "Spleen"]
    assert [item.SegmentNumber for item in seg.SegmentSequence] == [1, 2]
    assert seg.NumberOfFrames == 40


def test_rejects_bad_labelmaps(volume: SourceVolume, spec: ModelSpec) -> None:
    with pytest.raises(SegmentationError, match="shape"):
        build_segmentation(
            volume, np.zeros((19, 512, 512), np.uint8), spec, software_version="0.1.0"
        )
    with pytest.raises(SegmentationError, match="integers"):
        build_segmentation(
            volume, np.zeros(volume.array.shape, np.float32), spec, software_version="0.1.0"
        )
    unknown = np.zeros(volume.array.shape, np.uint8)
    unknown[0, 0, 0] = 7
    with pytest.raises(SegmentationError, match=r"\[7\]"):
        build_segmentation(volume, unknown, spec, software_version="0.1.0")


def test_write_into_missing_folder_fails_cleanly(
    volume: SourceVolume, spec: ModelSpec, tmp_path: Path
) -> None:
    seg = build_segmentation(volume, _box_labelmap(volume), spec, software_version="0.1.0")
    assert seg is not None
    with pytest.raises(SegmentationError, match="missing"):
        write_segmentation(seg, tmp_path / "missing" / "seg.dcm")


def test_content_label_for() -> None:
    assert content_label_for("liver-unet.v1") == "LIVER_UNET_V1"
    assert content_label_for("a" * 40) == "A" * 16
    # Cut at 16 characters right after a separator: no trailing "_" (highdicom refuses it).
    assert content_label_for("ct-abdomen-unet-2d") == "CT_ABDOMEN_UNET"


def test_laterality_modifier_is_written_inside_the_property_type(
    volume: SourceVolume, tmp_path: Path
) -> None:
    kidney = {"code": "64033007", "scheme": "SCT", "meaning": "Kidney"}
    left = {"code": "7771000", "scheme": "SCT", "meaning": "Left"}
    card = ModelSpec.model_validate(
        {
            "name": "kidneys",
            "version": "1",
            "weights": {"architecture": "unet"},
            "labels": [
                {
                    "value": 1,
                    "name": "kidney_left",
                    "category": ANATOMY,
                    "type": kidney,
                    "modifier": left,
                    "color": [185, 102, 83],
                }
            ],
        }
    )
    seg = build_segmentation(volume, _box_labelmap(volume), card, software_version="0.1.0")
    assert seg is not None
    path = tmp_path / "kidney.dcm"
    write_segmentation(seg, path)
    check_with_dciodvfy(path, "Segmentation")
    (item,) = pydicom.dcmread(path).SegmentSequence
    (prop,) = item.SegmentedPropertyTypeCodeSequence
    assert prop.CodeValue == "64033007"
    (modifier,) = prop.SegmentedPropertyTypeModifierCodeSequence
    assert (modifier.CodeValue, modifier.CodingSchemeDesignator) == ("7771000", "SCT")


def test_labelmap_seg_holds_the_same_segments_smaller(
    volume: SourceVolume,
    spec: ModelSpec,
    written: Path,
    sources: dict[str, pydicom.Dataset],
    tmp_path: Path,
) -> None:
    labels = _box_labelmap(volume)
    labels[labels.shape[0] // 2, 10:30, 10:30] = 2
    seg = build_segmentation(volume, labels, spec, software_version="0.1.0", seg_type="labelmap")
    assert seg is not None
    path = tmp_path / "labelmap.dcm"
    write_segmentation(seg, path)
    back = hd.seg.segread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless
    assert back.SegmentationType == "LABELMAP"
    # highdicom describes the background of a label map as segment 0.
    assert [(item.SegmentNumber, item.SegmentLabel) for item in back.SegmentSequence] == [
        (0, "Background"),
        (1, "Liver"),
        (2, "Spleen"),
    ]
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, dtype=np.uint8
    )
    np.testing.assert_array_equal(pixels, labels)
    # dciodvfy 20220618 predates the Label Map Segmentation IOD ("Information Object Not
    # found"), so this SEG is checked by highdicom's reading alone.
    assert path.stat().st_size < written.stat().st_size / 4


def test_seg_type_is_binary_or_labelmap(volume: SourceVolume, spec: ModelSpec) -> None:
    binary = build_segmentation(
        volume, _box_labelmap(volume), spec, software_version="0.1.0", seg_type="Binary"
    )
    assert binary is not None
    assert binary.SegmentationType == "BINARY"
    with pytest.raises(SegmentationError, match="seg_type"):
        build_segmentation(
            volume, _box_labelmap(volume), spec, software_version="0.1.0", seg_type="fractional"
        )


def test_build_makes_no_volume_sized_copies(volume: SourceVolume, spec: ModelSpec) -> None:
    labels = _box_labelmap(volume)
    tracemalloc.start()
    try:
        seg = build_segmentation(volume, labels, spec, software_version="0.1.0")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seg is not None
    # The BINARY frames themselves are an eighth of the label map; a copy of it is not.
    assert peak < labels.nbytes
