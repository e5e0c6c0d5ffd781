"""Multi-frame images (Legacy Converted Enhanced CT, Enhanced CT/MR, two phases in one
object) made from subject B's real slices: read into stacks, decoded, segmented into a SEG
that references the source frames. Geometry is checked against the source files, read with
pydicom, and against subject B's own single-frame files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from scp_node.dicom.selection import SeriesRules, choose_stack
from scp_node.dicom.volume import SourceVolume, load_stack, load_volume, read_series, read_stacks
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation
from tests.conftest import REPO_ROOT
from tests.support.enhanced import enhanced, legacy_converted, two_phase


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")


@pytest.fixture(scope="module")
def built(ct_b_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("multi-frame")
    return {
        "legacy": legacy_converted(ct_b_files, folder / "legacy.dcm"),
        "enhanced_ct": enhanced(ct_b_files, folder / "enhanced-ct.dcm"),
        "enhanced_mr": enhanced(ct_b_files, folder / "enhanced-mr.dcm", modality="MR"),
        "two_phase": two_phase(ct_b_files, ct_b_files[3:17], folder / "two-phase.dcm"),
    }


def _source_frame_positions(path: Path) -> dict[int, tuple[float, ...]]:
    """Frame number -> ImagePositionPatient, straight from the file's functional groups."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {
        number: tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1)
    }


def _box(volume: SourceVolume) -> np.ndarray:
    labelmap = np.zeros(volume.shape, dtype=np.uint8)
    labelmap[2:-2, 200:300, 180:320] = 1
    return labelmap


def _dciodvfy_errors(path: Path) -> list[str]:
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    assert report.returncode in (0, 1), report.stderr  # the tool ran
    assert report.stdout + report.stderr, "dciodvfy printed nothing"
    return [line for line in (report.stdout + report.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize("kind", ["legacy", "enhanced_ct", "enhanced_mr"])
def test_multi_frame_volume_equals_the_single_frame_series(
    kind: str, built: dict[str, Path], ct_b_files: list[Path]
) -> None:
    single = load_volume(ct_b_files)
    (stack,) = read_series([built[kind]])
    assert stack.refusal is None and stack.is_multi_frame
    assert stack.modality == ("MR" if kind == "enhanced_mr" else "CT")
    volume = load_stack(stack)
    assert volume.shape == (20, 512, 512)
    assert volume.spacing_zyx == pytest.approx((2.0, 0.9765625, 0.9765625))
    # Same voxels, same order along the normal, as the 20 source files.
    np.testing.assert_array_equal(volume.array, single.array)
    sources = _source_frame_positions(built[kind])
    for frame, ds in zip(volume.frames, single.datasets, strict=True):
        assert frame.frame_number is not None
        assert sources[frame.frame_number] == pytest.approx(
            tuple(float(v) for v in ds.ImagePositionPatient)
        )
    # highdicom agrees that the frames form a regular volume with this affine.
    assert stack.geometry is not None
    assert stack.geometry.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    first = np.array(volume.frames[0].position)
    assert np.allclose(stack.geometry.affine[:3, 3], first)


@pytest.mark.parametrize("kind", ["legacy", "enhanced_ct", "enhanced_mr"])
def test_seg_of_a_multi_frame_source_lies_on_its_frames(
    kind: str, built: dict[str, Path], spec: ModelSpec, tmp_path: Path
) -> None:
    source_path = built[kind]
    rules = SeriesRules(modalities=("MR",) if kind == "enhanced_mr" else ("CT",))
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    selection = choose_stack(read_stacks({str(source.SeriesInstanceUID): [source_path]}), rules)
    assert selection.stack is not None
    volume = load_stack(selection.stack)
    labelmap = _box(volume)
    seg = build_segmentation(volume, labelmap, spec, software_version="test")
    assert seg is not None
    path = tmp_path / "seg.dcm"
    write_segmentation(seg, path)
    assert _dciodvfy_errors(path) == []

    written = hd.seg.segread(path)
    positions = _source_frame_positions(source_path)
    referenced = [
        item.ReferencedSOPInstanceUID
        for series in written.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    ]
    assert referenced == [source.SOPInstanceUID]
    assert int(written.NumberOfFrames) == 20
    seen = set()
    for frame in written.PerFrameFunctionalGroupsSequence:
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        number = int(reference.ReferencedFrameNumber)
        seen.add(number)
        assert tuple(
            float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient
        ) == pytest.approx(positions[number])
    assert seen == set(positions)
    # highdicom reads the SEG back onto the source frames: the label map, frame by frame.
    numbers = [frame.frame_number for frame in volume.frames]
    back = written.get_pixels_by_source_frame(
        source.SOPInstanceUID, numbers, segment_numbers=[1], combine_segments=True
    )
    np.testing.assert_array_equal(back, labelmap)


def test_two_phases_in_one_object_become_two_stacks(
    built: dict[str, Path], ct_b_files: list[Path], spec: ModelSpec, tmp_path: Path
) -> None:
    source_path = built["two_phase"]
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    uid = str(source.SeriesInstanceUID)
    stacks = read_stacks({uid: [source_path]})
    found = stacks[uid]
    assert not isinstance(found, str)
    assert sorted(stack.slices for stack in found) == [14, 20]

    selection = choose_stack(stacks, SeriesRules())
    assert selection.stack is not None and selection.stack.slices == 20
    assert "fewer than 20" in next(iter(selection.passed_over.values()))
    assert selection.stack.name in selection.summary()
    chosen_frames = {frame.frame_number for frame in selection.stack.frames}
    temporal = {
        number: int(item.FrameContentSequence[0].TemporalPositionIndex)
        for number, item in enumerate(source.PerFrameFunctionalGroupsSequence, start=1)
    }
    assert {temporal[n] for n in chosen_frames if n is not None} == {1}

    volume = load_stack(selection.stack)
    np.testing.assert_array_equal(volume.array, load_volume(ct_b_files).array)
    seg = build_segmentation(volume, _box(volume), spec, software_version="test")
    assert seg is not None
    path = tmp_path / "seg.dcm"
    write_segmentation(seg, path)
    assert _dciodvfy_errors(path) == []
    positions = _source_frame_positions(source_path)
    for frame in hd.seg.segread(path).PerFrameFunctionalGroupsSequence:
        # One reference per frame, to the phase that was segmented.
        (reference,) = frame.DerivationImageSequence[0].SourceImageSequence
        number = int(reference.ReferencedFrameNumber)
        assert temporal[number] == 1
        assert tuple(
            float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient
        ) == pytest.approx(positions[number])


def test_frames_without_geometry_are_refused(built: dict[str, Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(built["legacy"])
    del ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    (stack,) = read_series([broken])
    assert stack.refusal == "broken.dcm frame 5: missing geometry (ImagePositionPatient)"
    selection = choose_stack({str(ds.SeriesInstanceUID): [stack]}, SeriesRules())
    assert selection.stack is None
    assert "missing geometry" in selection.summary()
