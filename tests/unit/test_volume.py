"""Stacks, selection and volume loading on subject B's real CT slices (ported from
test_series.py: the same assertions on the new modules, except where issue 10 changed the
behaviour: multi-frame images are read, irregular spacing is a warning)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from scp_node.dicom.selection import SeriesRules, choose_stack
from scp_node.dicom.volume import Stack, load_stack, load_volume, read_stacks
from scp_node.errors import SeriesError

CopySeries = Callable[..., list[Path]]


@pytest.fixture
def copy_series(tmp_path: Path) -> CopySeries:
    """Factory: copy files into a new folder, changing each dataset on the way."""

    def copy(
        files: list[Path],
        name: str,
        change: Callable[[int, Dataset], None] | None = None,
        *,
        new_series: bool = True,
    ) -> list[Path]:
        folder = tmp_path / name
        folder.mkdir()
        series_uid = generate_uid()
        copies = []
        for index, source in enumerate(files):
            ds = pydicom.dcmread(source)
            if new_series:
                ds.SeriesInstanceUID = series_uid
            if change is not None:
                change(index, ds)
            target = folder / source.name
            ds.save_as(target)
            copies.append(target)
        return copies

    return copy


def choose_series(series_files: dict[str, list[Path]], rules: SeriesRules) -> Any:
    """Headers of every series, then the rules: the worker's select step."""
    return choose_stack(read_stacks(series_files), rules)


def _series_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _z(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


# --- choose_series ---------------------------------------------------------------------


def test_choose_series_accepts_subject_b(ct_b_files: list[Path]) -> None:
    uid = _series_uid(ct_b_files[0])
    choice = choose_series({uid: ct_b_files}, SeriesRules())
    assert choice.series_instance_uid == uid
    assert choice.rejected == {}


def test_choose_series_rejects_wrong_modality(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    def to_mr(_: int, ds: Dataset) -> None:
        ds.Modality = "MR"

    mr = copy_series(ct_b_files, "mr", to_mr)
    ct_uid, mr_uid = _series_uid(ct_b_files[0]), _series_uid(mr[0])
    choice = choose_series({mr_uid: mr, ct_uid: ct_b_files}, SeriesRules(modalities=("CT",)))
    assert choice.series_instance_uid == ct_uid
    assert "modality MR" in choice.rejected[mr_uid]

    alone = choose_series({mr_uid: mr}, SeriesRules(modalities=("CT",)))
    assert alone.series_instance_uid is None
    assert set(alone.rejected) == {mr_uid}


def test_choose_series_rejects_too_few_slices(ct_b_files: list[Path]) -> None:
    uid = _series_uid(ct_b_files[0])
    choice = choose_series({uid: ct_b_files[:5]}, SeriesRules(min_slices=10))
    assert choice.series_instance_uid is None
    assert "5 distinct slice position(s)" in choice.rejected[uid]


def test_choose_series_counts_distinct_positions_not_files(ct_b_files: list[Path]) -> None:
    uid = _series_uid(ct_b_files[0])
    doubled = ct_b_files[:6] * 2
    choice = choose_series({uid: doubled}, SeriesRules(min_slices=10))
    assert choice.series_instance_uid is None
    assert "6 distinct" in choice.rejected[uid]


def test_choose_series_rejects_sagittal(ct_b_files: list[Path], copy_series: CopySeries) -> None:
    def sagittal(index: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-100.0 + 2.0 * index, -250.0, 100.0]

    files = copy_series(ct_b_files, "sagittal", sagittal)
    uid = _series_uid(files[0])
    choice = choose_series({uid: files}, SeriesRules(orientation="axial"))
    assert choice.series_instance_uid is None
    assert "not axial" in choice.rejected[uid]
    assert choose_series({uid: files}, SeriesRules(orientation="any")).series_instance_uid == uid


def test_choose_series_accepts_small_tilt(ct_b_files: list[Path], copy_series: CopySeries) -> None:
    angle = np.radians(5.0)
    column = [0.0, float(np.cos(angle)), float(np.sin(angle))]

    def tilted(_: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *column]

    files = copy_series(ct_b_files, "tilted", tilted)
    uid = _series_uid(files[0])
    assert choose_series({uid: files}, SeriesRules(max_tilt_deg=10)).series_instance_uid == uid
    choice = choose_series({uid: files}, SeriesRules(max_tilt_deg=2))
    assert "5.0 degrees" in choice.rejected[uid]


def test_choose_series_rejects_multi_frame(ct_b_files: list[Path], copy_series: CopySeries) -> None:
    def multi_frame(_: int, ds: Dataset) -> None:
        ds.NumberOfFrames = 3

    files = copy_series(ct_b_files, "enhanced", multi_frame)
    uid = _series_uid(files[0])
    choice = choose_series({uid: files}, SeriesRules())
    # Multi-frame images are read now (test_enhanced.py); one without per-frame geometry
    # is refused with the reason.
    assert choice.series_instance_uid is None
    assert "without one per-frame functional group per frame" in choice.rejected[uid]


def test_choose_series_rejects_missing_geometry(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    def no_spacing(index: int, ds: Dataset) -> None:
        if index == 3:
            del ds.PixelSpacing

    files = copy_series(ct_b_files, "nospacing", no_spacing)
    uid = _series_uid(files[0])
    choice = choose_series({uid: files}, SeriesRules())
    assert choice.series_instance_uid is None
    assert "PixelSpacing" in choice.rejected[uid]
    assert files[3].name in choice.rejected[uid]


def test_choose_series_rejects_unreadable_file(ct_b_files: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 10)
    uid = _series_uid(ct_b_files[0])
    choice = choose_series({uid: [*ct_b_files, broken]}, SeriesRules())
    assert choice.series_instance_uid is None
    assert choice.rejected[uid].startswith("broken.dcm: unreadable")


def test_choose_series_prefers_more_slices_then_finer_spacing(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    def coarser(_: int, ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z * 1.5]

    coarse = copy_series(ct_b_files, "coarse", coarser)
    fewer = copy_series(ct_b_files[:15], "fewer")
    b_uid = _series_uid(ct_b_files[0])
    series = {
        _series_uid(coarse[0]): coarse,
        _series_uid(fewer[0]): fewer,
        b_uid: ct_b_files,
    }
    choice = choose_series(series, SeriesRules())
    assert choice.series_instance_uid == b_uid
    assert choice.rejected == {}


# --- load_volume -----------------------------------------------------------------------


def test_load_volume_subject_b(ct_b_files: list[Path]) -> None:
    volume = load_volume(ct_b_files)
    assert volume.array.shape == (20, 512, 512)
    # Slope 1 and intercept -1024: whole Hounsfield units, exact in half the memory.
    assert volume.array.dtype == np.int16
    assert all("PixelData" not in ds for ds in volume.datasets)
    assert volume.spacing_zyx == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.modality == "CT"
    first = pydicom.dcmread(ct_b_files[0], stop_before_pixels=True)
    assert volume.series_instance_uid == first.SeriesInstanceUID
    assert volume.frame_of_reference_uid == first.FrameOfReferenceUID

    # IOP is identity, so the slice normal is +z: increasing z along axis 0.
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert z == sorted(z)
    assert len(set(z)) == 20
    assert z == sorted(_z(path) for path in ct_b_files)

    assert volume.array.min() >= -1100
    assert volume.array.max() <= 3100
    assert float(np.median(volume.array[:, :20, :20])) < -900  # air outside the body
    # Compare one slice with pydicom's own decoding and rescale of the source file.
    source = pydicom.dcmread(ct_b_files[7])
    index = z.index(float(source.ImagePositionPatient[2]))
    expected = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[index], expected.astype(np.float32))
    assert volume.datasets[index].SOPInstanceUID == source.SOPInstanceUID


def test_without_pixels_keeps_geometry_and_headers_only(ct_b_files: list[Path]) -> None:
    volume = load_volume(ct_b_files)
    light = volume.without_pixels()
    assert light.shape == volume.shape and light.array.dtype == volume.array.dtype
    assert light.array.strides == (0, 0, 0)  # one element behind the whole shape
    assert light.datasets == volume.datasets and light.spacing_zyx == volume.spacing_zyx


def test_load_volume_turns_float_for_a_fractional_rescale(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    def halve(index: int, ds: Dataset) -> None:
        if index == 12:
            ds.RescaleSlope = "0.5"

    files = copy_series(ct_b_files, "half", halve)
    volume = load_volume(files)
    assert volume.array.dtype == np.float32
    for path in files:
        source = pydicom.dcmread(path)
        index = [ds.SOPInstanceUID for ds in volume.datasets].index(source.SOPInstanceUID)
        slope, intercept = float(source.RescaleSlope), float(source.RescaleIntercept)
        expected = source.pixel_array.astype(np.float32) * np.float32(slope) + intercept
        np.testing.assert_array_equal(volume.array[index], expected)
    assert np.any(volume.array % 1 != 0)


def test_load_volume_is_independent_of_file_order(ct_b_files: list[Path]) -> None:
    shuffled = list(ct_b_files)
    random.Random(7).shuffle(shuffled)
    assert shuffled != ct_b_files
    reference, result = load_volume(ct_b_files), load_volume(shuffled)
    np.testing.assert_array_equal(reference.array, result.array)
    assert [ds.SOPInstanceUID for ds in reference.datasets] == [
        ds.SOPInstanceUID for ds in result.datasets
    ]
    assert reference.spacing_zyx == result.spacing_zyx


def test_load_volume_rejects_inconsistent_rows(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    def fewer_rows(index: int, ds: Dataset) -> None:
        if index == 4:
            ds.Rows = 256

    files = copy_series(ct_b_files, "rows", fewer_rows)
    with pytest.raises(SeriesError, match="Rows"):
        load_volume(files)


def test_load_volume_rejects_mixed_frames_of_reference(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    def other_frame(index: int, ds: Dataset) -> None:
        if index == 9:
            ds.FrameOfReferenceUID = generate_uid()

    files = copy_series(ct_b_files, "for", other_frame)
    with pytest.raises(SeriesError, match="FrameOfReferenceUID"):
        load_volume(files)


def test_load_volume_reads_a_gapped_series_with_a_warning(ct_b_files: list[Path]) -> None:
    # Issue 10: a missing slice no longer fails the job; the slices present are kept and
    # the gap is said in words.
    present = [*ct_b_files[:8], *ct_b_files[9:]]
    volume = load_volume(present)
    assert volume.shape == (19, 512, 512)
    assert volume.spacing_zyx[0] == pytest.approx(2.0)
    assert volume.warnings == ("1 gap of 4.0 mm in a 2.0 mm series (1 slice(s) missing)",)
    assert sorted(_z(path) for path in present) == [frame.position[2] for frame in volume.frames]


def test_load_volume_keeps_highest_instance_number_of_duplicates(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    def resent(_: int, ds: Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = 9999

    (again,) = copy_series(ct_b_files[5:6], "resent", resent, new_series=False)
    volume = load_volume([again, *ct_b_files])
    assert volume.array.shape == (20, 512, 512)
    uids = {str(ds.SOPInstanceUID) for ds in volume.datasets}
    assert str(pydicom.dcmread(again, stop_before_pixels=True).SOPInstanceUID) in uids
    original = str(pydicom.dcmread(ct_b_files[5], stop_before_pixels=True).SOPInstanceUID)
    assert original not in uids


def test_load_volume_rejects_multi_frame(ct_b_files: list[Path], copy_series: CopySeries) -> None:
    def multi_frame(_: int, ds: Dataset) -> None:
        ds.NumberOfFrames = 2

    files = copy_series(ct_b_files[:2], "mf", multi_frame)
    with pytest.raises(SeriesError, match="NumberOfFrames 2 without one per-frame"):
        load_volume(files)


def test_load_volume_rejects_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="no files"):
        load_volume([])
    missing = tmp_path / "missing.dcm"
    with pytest.raises(SeriesError, match=r"missing\.dcm"):
        load_volume([missing])


# --- uncompressed pixels read at their offset (issue 10: big studies parse each file once) --


def _stored_values(path: Path) -> np.ndarray:
    """pydicom's own decoding of a whole file, rescaled: what a volume slice must hold."""
    source = pydicom.dcmread(path)
    return source.pixel_array.astype(np.float32) * float(source.RescaleSlope) + float(
        source.RescaleIntercept
    )


def _stacks(files: list[Path]) -> list[Stack]:
    stacks = read_stacks({"s": files})["s"]
    assert not isinstance(stacks, str), stacks
    return stacks


def _uncompressed(syntax: str) -> Callable[[int, Dataset], None]:
    def change(_: int, ds: Dataset) -> None:
        ds.decompress()  # JPEG 2000 -> Explicit VR Little Endian, pixels as decoded
        ds.file_meta.TransferSyntaxUID = syntax

    return change


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_load_volume_reads_uncompressed_pixels_at_their_offset(
    ct_b_files: list[Path], copy_series: CopySeries, syntax: str
) -> None:
    files = copy_series(ct_b_files[:6], "native", _uncompressed(syntax))
    (stack,) = _stacks(files)
    for frame in stack.frames:
        # Where pydicom, deferring the value, says the PixelData element starts.
        deferred = pydicom.dcmread(frame.path, defer_size=1024)
        header_length = 8 if syntax == ImplicitVRLittleEndian else 12
        assert deferred.file_meta.TransferSyntaxUID == syntax
        expected = deferred.get_item("PixelData", keep_deferred=True).value_tell - header_length
        assert frame.pixel_data_offset == expected
    expected = [_stored_values(frame.path) for frame in stack.frames]
    # The headers were read while selecting: loading does not parse them again (here it
    # could not), it reads the pixels where the header said they start.
    for frame in stack.frames:
        assert frame.pixel_data_offset is not None
        with frame.path.open("r+b") as handle:
            handle.write(b"\xff" * frame.pixel_data_offset)
    with pytest.raises(SeriesError, match="unreadable"):
        load_volume([stack.frames[0].path])
    volume = load_stack(stack)
    assert volume.array.dtype == np.int16
    assert all("PixelData" not in ds for ds in volume.datasets)
    for index, values in enumerate(expected):
        np.testing.assert_array_equal(volume.array[index], values)


def test_load_volume_clears_unused_high_bits_as_pydicom_does(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    # Signed 12-bit values in 16-bit words whose 4 unused bits hold junk: the value is the
    # low 12 bits, sign-extended (PS3.5 8.1.1), as pydicom decodes it.
    def signed_12_bits(index: int, ds: Dataset) -> None:
        _uncompressed(ExplicitVRLittleEndian)(index, ds)
        stored = ds.pixel_array.astype(np.uint16)
        ds.PixelData = ((stored & 0x0FFF) | 0xA000).astype("<u2").tobytes()
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 12, 11

    files = copy_series(ct_b_files[:4], "signed12", signed_12_bits)
    volume = load_volume(files)
    assert volume.array.dtype == np.int16
    assert volume.array.min() < -1024  # negative stored values came through sign-extended
    for index, frame in enumerate(volume.frames):
        np.testing.assert_array_equal(volume.array[index], _stored_values(frame.path))


def test_load_stack_reads_a_file_rewritten_since_its_header_was_read(
    ct_b_files: list[Path], copy_series: CopySeries
) -> None:
    files = copy_series(ct_b_files[:4], "moved", _uncompressed(ExplicitVRLittleEndian))
    (stack,) = _stacks(files)
    # The same instance written again with a longer header: its pixel data moved.
    moved = pydicom.dcmread(files[2])
    moved.ImageComments = "x" * 1000
    moved.save_as(files[2])
    volume = load_stack(stack)
    for index, frame in enumerate(volume.frames):
        np.testing.assert_array_equal(volume.array[index], _stored_values(frame.path))
