"""Series that are not one stack, and series rules choosing among stacks: subject B's real
slices changed the way scanners and archives change them (a second acquisition at the same
positions, a localizer, a derived recon, a gantry tilt, mixed orientations, non-images)."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from scp_node.dicom.selection import SeriesRules, choose_stack
from scp_node.dicom.volume import load_stack, read_stacks
from scp_node.inference.registry import ModelSpec
from scp_node.output.seg import build_segmentation, write_segmentation
from tests.conftest import REPO_ROOT

Change = Callable[[int, Dataset], None]


def _copy(files: list[Path], folder: Path, change: Change, series_uid: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for index, source in enumerate(files):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        change(index, ds)
        target = folder / f"{index:03d}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_second_acquisition_at_the_same_positions_is_its_own_stack(
    ct_b_files: list[Path], tmp_path: Path
) -> None:
    uid = _uid(ct_b_files[0])

    def second(_: int, ds: Dataset) -> None:
        ds.AcquisitionNumber = 99
        ds.InstanceNumber = int(ds.InstanceNumber) + 1000

    again = _copy(ct_b_files[:12], tmp_path / "second", second, uid)
    stacks = read_stacks({uid: [*ct_b_files, *again]})
    found = stacks[uid]
    assert not isinstance(found, str)
    assert {stack.label: stack.slices for stack in found} == {
        "acquisition 14": 20,
        "acquisition 99": 12,
    }
    selection = choose_stack(stacks, SeriesRules())
    assert selection.stack is not None and selection.stack.label == "acquisition 14"
    assert selection.passed_over == {f"{uid} (acquisition 99)": "12 slices, fewer than 20"}
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct_b_files}
    assert {frame.sop_instance_uid for frame in selection.stack.frames} == sources


def test_localizer_and_derived_images_are_set_apart(ct_b_files: list[Path], tmp_path: Path) -> None:
    uid = _uid(ct_b_files[0])

    def localizer(_: int, ds: Dataset) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]

    def derived(index: int, ds: Dataset) -> None:
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 0.5]

    scout = _copy(ct_b_files[:1], tmp_path / "scout", localizer, uid)
    recon = _copy(ct_b_files, tmp_path / "recon", derived, uid)
    stacks = read_stacks({uid: [*ct_b_files[:15], *scout, *recon]})
    selection = choose_stack(stacks, SeriesRules())
    assert selection.stack is not None
    assert selection.stack.label == "original" and selection.stack.slices == 15
    assert selection.rejected[f"{uid} (localizer)"] == "localizer (ImageType LOCALIZER)"
    assert (
        "derived/secondary images (ImageType DERIVED\\SECONDARY)"
        in (selection.rejected[f"{uid} (derived)"])
    )
    # A card that accepts derived images takes the recon: it has more slices.
    chosen = choose_stack(stacks, SeriesRules(accept_derived=True)).stack
    assert chosen is not None and chosen.label == "derived" and chosen.slices == 20


def test_gantry_tilt_is_segmented_on_the_acquired_grid(
    ct_b_files: list[Path], tmp_path: Path
) -> None:
    angle = math.radians(7.0)
    column = [0.0, math.cos(angle), math.sin(angle)]

    def tilted(_: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, *column]  # positions keep stepping in z

    uid = generate_uid()
    files = _copy(ct_b_files, tmp_path / "tilt", tilted, uid)
    selection = choose_stack(read_stacks({uid: files}), SeriesRules(max_tilt_deg=10))
    stack = selection.stack
    assert stack is not None and stack.slices == 20
    assert stack.geometry is None  # sheared: not a regular highdicom volume
    assert stack.spacing_mm == pytest.approx(2.0 * math.cos(angle))
    (warning,) = selection.warnings
    assert warning.startswith("gantry tilt: slices stacked 7.0 degrees off their normal")
    assert choose_stack(read_stacks({uid: files}), SeriesRules(max_tilt_deg=5)).stack is None

    volume = load_stack(stack)
    labelmap = np.zeros(volume.shape, dtype=np.uint8)
    labelmap[:, 200:300, 200:300] = 1
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    seg = build_segmentation(volume, labelmap, spec, software_version="test")
    assert seg is not None
    path = tmp_path / "seg.dcm"
    write_segmentation(seg, path)
    report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    assert report.stdout + report.stderr
    assert [line for line in (report.stdout + report.stderr).splitlines() if "Error" in line] == []
    written = hd.seg.segread(path)
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    iop = written.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    assert np.allclose([float(v) for v in iop.ImageOrientationPatient], [1, 0, 0, *column])
    for frame in written.PerFrameFunctionalGroupsSequence:
        reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
        source = pydicom.dcmread(by_uid[reference.ReferencedSOPInstanceUID])
        assert np.allclose(
            [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient],
        )


def test_mixed_orientations_in_one_stack_are_refused(
    ct_b_files: list[Path], tmp_path: Path
) -> None:
    def half_rotated(index: int, ds: Dataset) -> None:
        if index % 2:
            ds.ImageOrientationPatient = [0.996, 0.087, 0.0, -0.087, 0.996, 0.0]

    uid = generate_uid()
    files = _copy(ct_b_files, tmp_path / "mixed", half_rotated, uid)
    selection = choose_stack(read_stacks({uid: files}), SeriesRules())
    assert selection.stack is None
    assert selection.rejected[uid].startswith(
        "mixed orientations in one stack: 2 different ImageOrientationPatient"
    )


def test_non_image_objects_and_one_line_outcome(ct_b_files: list[Path], tmp_path: Path) -> None:
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    report.SOPInstanceUID = generate_uid()
    report.SeriesInstanceUID = sr_uid = generate_uid()
    report.Modality = "SR"
    sr = tmp_path / "sr.dcm"
    report.save_as(sr, implicit_vr=True, little_endian=True)
    ct_uid = _uid(ct_b_files[0])

    stacks = read_stacks({sr_uid: [sr], ct_uid: ct_b_files[:4]})
    assert stacks[sr_uid] == "no image in the series (1 non-image object(s))"
    selection = choose_stack(stacks, SeriesRules(min_slices=10))
    assert selection.stack is None
    line = selection.summary()
    assert "\n" not in line
    assert line.startswith("no matching series among 2 stack(s): ")
    assert f"{sr_uid}: no image in the series" in line
    assert f"{ct_uid}: 4 distinct slice position(s), at least 10 needed" in line


def test_rules_validate_their_values() -> None:
    with pytest.raises(ValueError, match="min_slices"):
        SeriesRules(min_slices=0)
    with pytest.raises(ValueError, match="max_tilt_deg"):
        SeriesRules(max_tilt_deg=120)
    spec = ModelSpec.from_model_dir(REPO_ROOT / "models" / "ct-abdomen")
    assert spec.series.rules() == SeriesRules(
        modalities=("CT",), min_slices=10, orientation="axial", max_tilt_deg=10
    )
