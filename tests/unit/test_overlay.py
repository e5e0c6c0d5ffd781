"""Burned-in Secondary Capture overlays on subject B's real CT slices (single-frame and an
Enhanced CT made from them): validated by dciodvfy, read back with pydicom, pixels and
geometry checked against the source files."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from scp_node.dicom.volume import SourceVolume, load_stack, load_volume, read_series
from scp_node.errors import OverlayError
from scp_node.inference.registry import ModelSpec
from scp_node.output.overlay import build_overlay_series
from scp_node.output.uids import OutputUids, output_uids
from tests.support.enhanced import enhanced, two_phase
from tests.support.validators import check_with_dciodvfy

ANATOMY = {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"}
LIVER_COLOUR = (221, 130, 101)
SPLEEN_COLOUR = (157, 108, 162)
#: Liver box on slices 5-8 (volume order), spleen box on slice 7 only.
LIVER_SLICES = range(5, 9)
LIVER_ROWS, LIVER_COLUMNS = slice(180, 300), slice(120, 260)
SPLEEN_SLICE = 7
SPLEEN_ROWS, SPLEEN_COLUMNS = slice(320, 380), slice(300, 380)
WINDOW = (50.0, 400.0)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": "liver-unet.v1",
            "version": "1.2.0",
            "weights": {"architecture": "unet"},
            "labels": [
                {
                    "value": 1,
                    "name": "Liver",
                    "category": ANATOMY,
                    "type": {"code": "10200004", "scheme": "SCT", "meaning": "Liver"},
                    "color": list(LIVER_COLOUR),
                },
                {
                    "value": 2,
                    "name": "Spleen",
                    "category": ANATOMY,
                    "type": {"code": "78961009", "scheme": "SCT", "meaning": "Spleen"},
                    "color": list(SPLEEN_COLOUR),
                },
            ],
        }
    )


@pytest.fixture(scope="module")
def volume(ct_b_files: list[Path]) -> SourceVolume:
    return load_volume(ct_b_files)


@pytest.fixture(scope="module")
def sources(ct_b_files: list[Path]) -> dict[str, Dataset]:
    """The source files read with pydicom alone (pixels included), by SOP Instance UID."""
    datasets = (pydicom.dcmread(path) for path in ct_b_files)
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def _labelmap(shape: tuple[int, int, int]) -> np.ndarray:
    labelmap = np.zeros(shape, dtype=np.uint8)
    labelmap[LIVER_SLICES.start : LIVER_SLICES.stop, LIVER_ROWS, LIVER_COLUMNS] = 1
    labelmap[SPLEEN_SLICE, SPLEEN_ROWS, SPLEEN_COLUMNS] = 2
    return labelmap


def _uids(volume: SourceVolume, spec: ModelSpec) -> OutputUids:
    return output_uids(
        "sc",
        source_series_instance_uid=volume.series_instance_uid,
        model_name=spec.name,
        model_version=spec.version,
        source_sop_instance_uids=(str(ds.SOPInstanceUID) for ds in volume.datasets),
    )


def _build(volume: SourceVolume, spec: ModelSpec, **kwargs: object) -> list[Dataset]:
    arguments: dict[str, object] = {
        "uids": _uids(volume, spec),
        "window": WINDOW,
        "software_version": "0.1.0",
        "series_number": 9903,
        **kwargs,
    }
    return build_overlay_series(volume, _labelmap(volume.shape), spec, **arguments)  # type: ignore[arg-type]


def _round_trip(image: Dataset) -> Dataset:
    buffer = BytesIO()
    image.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


@pytest.fixture(scope="module")
def images(volume: SourceVolume, spec: ModelSpec) -> list[Dataset]:
    """The overlay series, written and read back."""
    return [_round_trip(image) for image in _build(volume, spec)]


def _source_of(image: Dataset) -> str:
    (reference,) = image.SourceImageSequence
    return str(reference.ReferencedSOPInstanceUID)


def _is(pixels: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1)


def _floats(values: object) -> list[float]:
    return [float(v) for v in values]  # type: ignore[attr-defined]


def test_one_image_per_slice_with_findings_referencing_it(
    images: list[Dataset], volume: SourceVolume, sources: dict[str, Dataset]
) -> None:
    expected = [str(volume.datasets[z].SOPInstanceUID) for z in LIVER_SLICES]
    assert [_source_of(image) for image in images] == expected
    for image in images:
        (reference,) = image.SourceImageSequence
        source = sources[_source_of(image)]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert "ReferencedFrameNumber" not in reference
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert image.InstanceNumber == source.InstanceNumber


def test_dciodvfy_reports_no_error(images: list[Dataset], tmp_path: Path) -> None:
    for image in (images[0], images[SPLEEN_SLICE - LIVER_SLICES.start]):
        path = tmp_path / f"{image.SOPInstanceUID}.dcm"
        image.save_as(path, enforce_file_format=True)
        check_with_dciodvfy(path, "SCImage")


def test_header(images: list[Dataset], spec: ModelSpec, sources: dict[str, Dataset]) -> None:
    for image in images:
        source = sources[_source_of(image)]
        assert image.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert image.Modality == "OT"
        assert image.ConversionType == "WSD"
        assert list(image.ImageType) == ["DERIVED", "SECONDARY"]
        assert image.BurnedInAnnotation == "YES"
        assert image.SeriesDescription == "liver-unet.v1 overlay"
        assert image.SeriesNumber == 9903
        assert image.Manufacturer == "scp-node"
        assert image.ManufacturerModelName == spec.name
        assert image.SoftwareVersions == "0.1.0"
        assert (image.PhotometricInterpretation, image.SamplesPerPixel) == ("RGB", 3)
        assert (image.BitsAllocated, image.PixelRepresentation) == (8, 0)
        for keyword in (
            "PatientName",
            "PatientID",
            "IssuerOfPatientID",
            "PatientBirthDate",
            "PatientSex",
            "PatientWeight",
            "StudyInstanceUID",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
            "BodyPartExamined",
        ):
            assert keyword in source, keyword
            assert image[keyword].value == source[keyword].value, keyword
        assert image.SeriesInstanceUID != source.SeriesInstanceUID


def test_geometry_is_the_source_slices(images: list[Dataset], sources: dict[str, Dataset]) -> None:
    for image in images:
        source = sources[_source_of(image)]
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            assert _floats(image[keyword].value) == pytest.approx(_floats(source[keyword].value)), (
                keyword
            )
        assert float(image.SliceThickness) == float(source.SliceThickness)
        assert image.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert (image.Rows, image.Columns) == (source.Rows, source.Columns)
        assert list(image.PatientOrientation) == ["L", "P"]  # axial, LPS row/column


def test_uids_are_deterministic_and_distinct(
    images: list[Dataset], volume: SourceVolume, spec: ModelSpec
) -> None:
    uids = _uids(volume, spec)
    again = _build(volume, spec)
    instance_uids = [str(image.SOPInstanceUID) for image in images]
    assert [str(image.SOPInstanceUID) for image in again] == instance_uids
    assert len(set(instance_uids)) == len(instance_uids)
    assert not {uids.series_instance_uid, uids.sop_instance_uid} & set(instance_uids)
    for image in images:
        assert image.SeriesInstanceUID == uids.series_instance_uid
        assert image.file_meta.MediaStorageSOPInstanceUID == image.SOPInstanceUID
        assert UID(image.SOPInstanceUID).is_valid
        assert len(str(image.SOPInstanceUID)) <= 64
    # A changed source series (another instance set) gives other image UIDs.
    other = OutputUids(uids.series_instance_uid, uids.sop_instance_uid + "1")
    changed = _build(volume, spec, uids=other)
    assert not {str(image.SOPInstanceUID) for image in changed} & set(instance_uids)


def test_outlines_in_label_colour_at_the_border_not_inside(images: list[Dataset]) -> None:
    for image in images:
        pixels = image.pixel_array
        top, bottom = LIVER_ROWS.start, LIVER_ROWS.stop - 1
        left, right = LIVER_COLUMNS.start, LIVER_COLUMNS.stop - 1
        middle_row, middle_column = (top + bottom) // 2, (left + right) // 2
        # Two pixels wide, on the segment, on all four sides.
        for row, column in (
            (top, middle_column),
            (top + 1, middle_column),
            (bottom, middle_column),
            (middle_row, left),
            (middle_row, right - 1),
        ):
            assert tuple(pixels[row, column]) == LIVER_COLOUR, (row, column)
        inside = pixels[top + 3 : bottom - 2, left + 3 : right - 2]
        outside = pixels[top - 3 : top, left:right]
        for region in (inside, outside):
            assert not _is(region, LIVER_COLOUR).any()
            # Grey: the source through the window, untouched.
            assert (region[..., 0] == region[..., 1]).all()
            assert (region[..., 1] == region[..., 2]).all()
    spleen = images[SPLEEN_SLICE - LIVER_SLICES.start].pixel_array
    assert tuple(spleen[SPLEEN_ROWS.start, (SPLEEN_COLUMNS.start + 40)]) == SPLEEN_COLOUR
    assert not _is(images[0].pixel_array, SPLEEN_COLOUR)[SPLEEN_ROWS, SPLEEN_COLUMNS].any()


def test_source_is_windowed_as_the_card_says(
    images: list[Dataset], sources: dict[str, Dataset]
) -> None:
    image = images[0]
    source = sources[_source_of(image)]
    hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    center, width = WINDOW
    expected = np.clip((hu - (center - width / 2)) / width, 0, 1) * 255
    region = (slice(LIVER_ROWS.start + 3, LIVER_ROWS.stop - 3), slice(140, 240))
    grey = image.pixel_array[region][..., 0].astype(float)
    assert np.abs(grey - expected[region]).max() <= 1.0


def test_banner_and_legend_are_burned_in(images: list[Dataset], volume: SourceVolume) -> None:
    for image in images:
        pixels = image.pixel_array
        # The banner: light text across the top rows, the disclaimer spanning about half
        # the width, and the model line under it.
        bright = pixels.min(axis=-1) > 160
        columns = np.flatnonzero(bright[:18].any(axis=0))
        assert bright[:18].sum() > 150
        assert columns.min() < 16 and columns.max() > 250
        assert bright[18:40].sum() > 50
        # The legend at the bottom left: the liver swatch and name in its colour.
        legend = pixels[-60:, :120]
        assert _is(legend, LIVER_COLOUR).sum() > 50
    with_spleen = images[SPLEEN_SLICE - LIVER_SLICES.start].pixel_array[-60:, :120]
    assert _is(with_spleen, SPLEEN_COLOUR).sum() > 50
    assert not _is(images[0].pixel_array[-60:, :120], SPLEEN_COLOUR).any()


def test_max_images_picks_key_slices_with_the_same_uids(
    images: list[Dataset], volume: SourceVolume, spec: ModelSpec
) -> None:
    chosen = _build(volume, spec, max_images=2)
    assert len(chosen) == 2
    by_source = {_source_of(image): str(image.SOPInstanceUID) for image in images}
    for image in chosen:
        assert by_source[_source_of(image)] == image.SOPInstanceUID
    # The slice with the largest segmented area (liver and spleen) is one of them.
    assert str(volume.datasets[SPLEEN_SLICE].SOPInstanceUID) in {
        _source_of(image) for image in chosen
    }


def test_no_findings_no_images(volume: SourceVolume, spec: ModelSpec) -> None:
    empty = np.zeros(volume.shape, dtype=np.uint8)
    assert (
        build_overlay_series(
            volume,
            empty,
            spec,
            uids=_uids(volume, spec),
            window=None,
            software_version="0.1.0",
            series_number=9903,
        )
        == []
    )


def test_without_a_window_all_images_share_one(volume: SourceVolume, spec: ModelSpec) -> None:
    images = _build(volume, spec, window=None)
    # Below the boxes, clear of text: one window means grey never falls as HU rises,
    # across all images together (a window per slice would break that).
    region = (slice(320, 360), slice(140, 240))
    hu = np.concatenate([volume.array[z][region].ravel() for z in LIVER_SLICES])
    grey = np.concatenate([image.pixel_array[region][..., 0].ravel() for image in images])
    order = np.argsort(hu, kind="stable")
    assert (np.diff(grey[order].astype(int)) >= 0).all()
    assert grey.min() < grey.max()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labelmap": "shape"}, "shape"),
        ({"labelmap": "float"}, "integers"),
        ({"labelmap": "unknown"}, r"values \[7\]"),
        ({"window": (40.0, 0.0)}, "window width"),
        ({"max_images": 0}, "max_images"),
        ({"series_number": 0}, "series_number"),
    ],
)
def test_rejects_bad_arguments(
    volume: SourceVolume, spec: ModelSpec, change: dict[str, object], message: str
) -> None:
    labelmap = _labelmap(volume.shape)
    arguments: dict[str, object] = {
        "uids": _uids(volume, spec),
        "window": WINDOW,
        "software_version": "0.1.0",
        "series_number": 9903,
        **change,
    }
    given = labelmap
    fault = arguments.pop("labelmap", None)
    if fault == "shape":
        given = labelmap[:, :-1]
    elif fault == "float":
        given = labelmap.astype(np.float32)
    elif fault == "unknown":
        given = labelmap.copy()
        given[0, 0, 0] = 7
    with pytest.raises(OverlayError, match=message):
        build_overlay_series(volume, given, spec, **arguments)  # type: ignore[arg-type]


def _frame_positions(path: Path) -> dict[int, tuple[float, ...]]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        number: tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1)
    }


def test_enhanced_ct_source_references_instance_and_frame(
    ct_b_files: list[Path], spec: ModelSpec, tmp_path: Path
) -> None:
    path = enhanced(ct_b_files[4:12], tmp_path / "enhanced.dcm")
    source = pydicom.dcmread(path, stop_before_pixels=True)
    (stack,) = read_series([path])
    volume = load_stack(stack)
    labelmap = np.zeros(volume.shape, dtype=np.uint8)
    labelmap[2:5, LIVER_ROWS, LIVER_COLUMNS] = 1
    images = build_overlay_series(
        volume,
        labelmap,
        spec,
        uids=_uids(volume, spec),
        window=WINDOW,
        software_version="0.1.0",
        series_number=9903,
    )
    assert len(images) == 3
    positions = _frame_positions(path)
    thickness = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    numbers = []
    for image, frame in zip(images, volume.frames[2:5], strict=True):
        (reference,) = image.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        number = int(reference.ReferencedFrameNumber)
        assert number == frame.frame_number
        numbers.append(number)
        assert image.InstanceNumber == number
        assert tuple(_floats(image.ImagePositionPatient)) == pytest.approx(positions[number])
        assert float(image.SliceThickness) == pytest.approx(float(thickness))
        assert image.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert image.PatientID == source.PatientID
        assert image.StudyInstanceUID == source.StudyInstanceUID
    assert len({str(image.SOPInstanceUID) for image in images}) == 3
    out = tmp_path / "overlay.dcm"
    images[0].save_as(out, enforce_file_format=True)
    check_with_dciodvfy(out, "SCImage")


def test_second_phase_references_its_own_frames(
    ct_b_files: list[Path], spec: ModelSpec, tmp_path: Path
) -> None:
    path = two_phase(ct_b_files[4:10], ct_b_files[4:10], tmp_path / "two-phase.dcm")
    stacks = read_series([path])
    assert len(stacks) == 2
    volume = load_stack(stacks[1])
    labelmap = np.zeros(volume.shape, dtype=np.uint8)
    labelmap[3, LIVER_ROWS, LIVER_COLUMNS] = 1
    (image,) = build_overlay_series(
        volume,
        labelmap,
        spec,
        uids=_uids(volume, spec),
        window=WINDOW,
        software_version="0.1.0",
        series_number=9903,
    )
    (reference,) = image.SourceImageSequence
    number = int(reference.ReferencedFrameNumber)
    assert number == volume.frames[3].frame_number
    assert number > 6  # the second phase's frames follow the first phase's six
    assert tuple(_floats(image.ImagePositionPatient)) == pytest.approx(
        _frame_positions(path)[number]
    )
